"""A member of an ensemble fails mid-training: no outputs, no logged model, the MLflow run FAILED,
nothing registered, one error line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import merged, raw_params

pytestmark = pytest.mark.slow

# The train stage's own main(), with the second member's labels made impossible (10 in a 10-class
# problem): TensorFlow's loss then raises inside that member's real `fit`, after member 1 finished.
TRAIN_WITH_A_FAILING_SECOND_MEMBER = textwrap.dedent("""
    import numpy as np
    import pipeline.core.ensemble as ensemble
    import pipeline.train

    real_fit, calls = ensemble.fit, []

    def fit(recipe, epochs, patience, x_train, y_train, *rest, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            y_train = np.full_like(y_train, 10)
        return real_fit(recipe, epochs, patience, x_train, y_train, *rest, **kwargs)

    ensemble.fit = fit
    raise SystemExit(pipeline.train.main([]))
""")


@pytest.fixture
def tiny_train_project(tmp_path, mnist_npz):
    """A folder with params.yaml, tiny train/val splits and an empty tracking store; train reads nothing else."""
    with np.load(mnist_npz) as data:
        x, y = data["x_train"][:384], data["y_train"][:384]
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    np.savez(prepared / "train.npz", x=x[:256], y=y[:256])
    np.savez(prepared / "val.npz", x=x[256:], y=y[256:])
    params = merged(raw_params(), {
        "train": {"preset": "reference", "use_tuned": False, "epochs": 1, "patience": 1, "members": 2},
        "presets": {"reference": {"conv_filters": [4], "dense_units": 0, "batch_size": 64}},
    })
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_a_failing_member_leaves_no_partial_ensemble(tiny_train_project):
    import mlflow

    store = f"sqlite:///{tiny_train_project / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=store, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", TRAIN_WITH_A_FAILING_SECOND_MEMBER], cwd=tiny_train_project,
                            env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: member 2 of 2 (seed 43) failed: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for output in ("models/model.keras", "models/train_run.json", "metrics/train_history.csv"):
        assert not (tiny_train_project / output).exists(), output
    leftovers = [path for path in tiny_train_project.rglob(".staging-*")]
    assert leftovers == []

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "member1/val_accuracy" in run.data.metrics  # member 1 did train ...
    assert "ensemble_val_accuracy" not in run.data.metrics  # ... but no ensemble was made
    assert client.search_logged_models([experiment.experiment_id]) == []
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == []
    assert client.search_registered_models() == []
