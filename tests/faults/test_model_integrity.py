"""Model integrity: `serve`, `web` and `predict` load only the project's registered format, hash-checked,
and re-scoring a champion loads its Keras file only once its hash is checked.

A version whose ONNX file changed after registration, a version of another flavour (a pickled pyfunc,
which would run code when loaded) and a version without the recorded hash are each refused in one line;
so is a version whose model.keras changed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.serving.fixtures import REPO, mnist_file, register_model, tiny_model_path, vertical_one  # noqa: F401

pytestmark = pytest.mark.slow

NAME = "mnist-cnn-integrity"


def always_seven():
    """A pyfunc model (loading one unpickles code) that answers 7."""
    import mlflow.pyfunc

    class AlwaysSeven(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [[0.0] * 7 + [1.0] + [0.0] * 2 for _ in range(len(model_input))]

    return AlwaysSeven()


@pytest.fixture(scope="module")
def store(tiny_model_path, mnist_file, tmp_path_factory):
    """A scratch store with versions 1 the project's (then its ONNX file tampered with), 2 the project's
    without its hash tag, 3 a pyfunc model, 4 the project's, untouched, and 5 the project's with its
    Keras file tampered with."""
    import mlflow

    scratch = tmp_path_factory.mktemp("integrity")
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    try:
        register_model(tiny_model_path, NAME, mnist_file, scratch / "artifacts-1")
        register_model(tiny_model_path, NAME, mnist_file, scratch / "artifacts-2")
        client = mlflow.MlflowClient()
        client.delete_model_version_tag(NAME, "2", "onnx_sha256")
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(scratch / "artifacts-3").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(name="model", python_model=always_seven(), registered_model_name=NAME,
                                    pip_requirements=["mlflow"])
        register_model(tiny_model_path, NAME, mnist_file, scratch / "artifacts-4")
        register_model(tiny_model_path, NAME, mnist_file, scratch / "artifacts-5")
        for artifacts, name in (("artifacts-1", "model.onnx"), ("artifacts-5", "model.keras")):
            files = list((scratch / artifacts).rglob(name))
            assert len(files) == 1 and files[0].resolve().is_relative_to(scratch.resolve())
            data = bytearray(files[0].read_bytes())
            data[len(data) // 2] ^= 0xFF  # one changed byte, in the scratch store only
            files[0].write_bytes(bytes(data))
        yield {"uri": uri, "folder": scratch}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


REFUSALS = {
    "1": "does not match its registered sha256",
    "2": "records no onnx_sha256 tag",
    "3": "is not this project's model format",
}


@pytest.mark.parametrize("version", sorted(REFUSALS))
def test_predict_refuses_in_one_line(store, version, tmp_path, capsys):
    from pipeline.commands.predict import main

    picture = tmp_path / "one.png"
    vertical_one().save(picture)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", f"models:/{NAME}/{version}", str(picture)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert REFUSALS[version] in err and "\n" not in err and "Traceback" not in err


def test_the_untouched_version_loads(store, tmp_path, capsys):
    from pipeline.commands.predict import main

    picture = tmp_path / "one.png"
    vertical_one().save(picture)
    assert main(["--model", f"models:/{NAME}/4", str(picture)]) == 0
    assert capsys.readouterr().out.startswith(f"{picture}: 1 (")


@pytest.mark.parametrize("version", sorted(REFUSALS))
def test_web_refuses_with_503_and_one_line(store, version):
    from pipeline.serving.web import create_app
    from tests.serving.test_web import canvas_data_url

    response = create_app(f"models:/{NAME}/{version}").test_client().post("/api/predict", json={"image": canvas_data_url()})
    assert response.status_code == 503
    message = response.get_json()["error"]
    assert REFUSALS[version] in message and "\n" not in message


def test_serve_refuses_to_start(store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    for version, phrase in REFUSALS.items():
        result = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--model", f"models:/{NAME}/{version}",
                                 "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, version
        assert lines and phrase in lines[-1] and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_rescoring_refuses_a_changed_keras_file_in_one_line(store, mnist_file):
    import numpy as np

    from pipeline.core.data import Split
    from pipeline.core.errors import PipelineError
    from pipeline.core.scoring import make_scorer

    with np.load(mnist_file) as data:
        score = make_scorer(Split(data["x_test"][:200], data["y_test"][:200]), batch_size=100)
    assert 0.0 < score(f"models:/{NAME}/4") <= 1.0
    with pytest.raises(PipelineError) as refused:
        score(f"models:/{NAME}/5")
    message = str(refused.value)
    assert "data/model.keras does not match its registered sha256" in message and "dvc repro" in message
    assert "\n" not in message
