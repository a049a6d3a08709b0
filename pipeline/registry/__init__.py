"""The MLflow model registry: the promotion decision (`decision`), the locks that serialise
promotions (`locks`) and the registry's versions and aliases (`store`)."""
