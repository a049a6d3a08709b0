"""After the registry: the prediction log, the input features it records, the drift report, and
user feedback as versioned training data. Imports only `pipeline.core`; takes 28x28 pixel arrays,
never pictures."""
