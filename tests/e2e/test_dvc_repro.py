"""End to end: real `dvc repro` on a tiny configuration, a real MLflow store and registry."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import dvc, project_env, run

pytestmark = pytest.mark.slow


def mlflow_client(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_metrics_and_figures_are_written(tiny_project):
    metrics = json.loads((tiny_project / "metrics" / "evaluate.json").read_text())
    assert metrics["test_images"] == 1000
    assert 0.5 < metrics["test"]["accuracy"] <= 1.0  # 2 epochs on 3000 images: far above chance
    assert set(metrics["test"]) >= {"accuracy", "loss", "macro_precision", "macro_recall", "macro_f1"}
    per_class = json.loads((tiny_project / "metrics" / "per_class.json").read_text())
    assert sorted(per_class) == [str(d) for d in range(10)]
    rows = (tiny_project / "metrics" / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1001
    for name in ("confusion_matrix.png", "training_curves.png", "misclassified.png", "handwriting_predictions.png"):
        assert (tiny_project / "figures" / name).read_bytes().startswith(b"\x89PNG")
    handwriting = json.loads((tiny_project / "metrics" / "handwriting.json").read_text())["handwriting"]
    assert handwriting["count"] == 40 and 0.0 <= handwriting["accuracy"] <= 1.0
    history = (tiny_project / "metrics" / "train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate" and len(history) == 3


def test_dvc_sees_metrics_and_plots(tiny_project):
    shown = json.loads(dvc("metrics", "show", "--json", project=tiny_project).stdout)
    files = shown[""]["data"]
    assert files["metrics/evaluate.json"]["data"]["test"]["accuracy"] > 0.5
    assert files["metrics/tune.json"]["data"]["trials"]["COMPLETE"] >= 1
    assert "accuracy" in files["metrics/handwriting.json"]["data"]["handwriting"]  # the real-world figure: `dvc metrics diff` tracks it
    check = files["metrics/ood.json"]["data"]["digit_check"]  # the digit verdict's figures, tracked the same way
    assert set(check["heldout"]) == {"letters_symbols", "doodles", "noise_blank", "clothing"}
    assert check["accepted"]["validation_digits"] >= 0.995
    rendered = dvc("plots", "show", "--json", project=tiny_project).stdout
    assert "metrics/confusion.csv" in rendered and "training curves" in rendered


def test_the_readme_exp_show_example_shows_the_named_columns(tiny_project):
    """The README's `dvc exp show --only-changed --drop ... --keep ...` line, run as written."""
    import re
    import shlex
    import subprocess

    readme = (tiny_project / "README.md").read_text()
    line = re.search(r"^dvc exp show --only-changed .*\\\n  --keep .*$", readme, re.MULTILINE).group(0)
    command = shlex.split(line.replace("\\\n", " ")) + ["--no-pager", "--md"]
    shown = subprocess.run(command, cwd=tiny_project, env={**project_env(tiny_project), "COLUMNS": "400"},
                           capture_output=True, text=True, timeout=120, check=True).stdout
    header = [cell.strip() for cell in shown.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["Experiment", "test.accuracy", "handwriting.accuracy", "digit_check.accepted.test_digits",
                          "digit_check.rejected_heldout"], header
    assert {"train.epochs", "train.preset"} <= set(header)


def test_logged_model_loads_back_and_predicts(tiny_project, mnist_npz):
    import mlflow.keras

    client = mlflow_client(tiny_project)
    record = json.loads((tiny_project / "models" / "train_run.json").read_text())
    run = client.get_run(record["run_id"])
    assert run.data.tags["mnist.run_kind"] == "train"
    assert run.data.tags["params_hash"] and run.data.tags["mlflow.source.git.commit"] != "unknown"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.metrics["test_accuracy"] > 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/confusion_matrix.png", "figures/training_curves.png", "figures/misclassified.png"} <= artifacts

    model = mlflow.keras.load_model("models:/mnist-cnn@champion")
    with np.load(mnist_npz) as data:
        x, y = data["x_test"][:200], data["y_test"][:200]
    probabilities = model.predict(x.reshape(-1, 28, 28, 1).astype(np.float32), verbose=0)
    assert probabilities.shape == (200, 10)
    assert (probabilities.argmax(axis=1) == y).mean() > 0.5


def test_version_is_registered_with_metrics_and_champion(tiny_project):
    client = mlflow_client(tiny_project)
    versions = client.search_model_versions("name='mnist-cnn'")
    assert len(versions) == 1
    version = versions[0]
    assert float(version.tags["test_accuracy"]) > 0.5
    assert version.tags["validation_status"] == "promoted"
    assert client.get_model_version_by_alias("mnist-cnn", "champion").version == version.version
    assert len(version.tags["onnx_sha256"]) == 64 and len(version.tags["keras_sha256"]) == 64
    assert client.get_model_version_by_alias("mnist-cnn", "challenger").version == version.version


def test_second_repro_is_a_no_op(tiny_project):
    result = dvc("repro", project=tiny_project)
    assert "Data and pipelines are up to date" in result.stdout
    assert "Running stage" not in result.stdout


def changed_stages(project) -> set[str]:
    return set(json.loads(dvc("status", "--json", project=project).stdout))


@pytest.mark.parametrize(("module", "stages"), [
    ("pipeline/core/runtime.py", {"fetch", "preprocess", "tune", "train", "evaluate"}),  # the precision policy
    ("pipeline/core/config.py", {"fetch", "preprocess", "tune", "train", "evaluate"}),  # every knob's parsing
    ("pipeline/core/training.py", {"tune", "train"}),
    ("pipeline/serving/images.py", {"evaluate"}),  # the handwriting score prepares pictures as users' are
])
def test_a_code_change_reruns_every_stage_that_runs_the_code(tiny_project, module, stages):
    path = tiny_project / module
    original = path.read_text()
    assert changed_stages(tiny_project) == set()
    path.write_text(original + "\n# changed\n")
    try:
        assert changed_stages(tiny_project) == stages
    finally:
        path.write_text(original)
    assert changed_stages(tiny_project) == set()


def test_only_the_presets_a_stage_uses_are_its_dependencies(tiny_project):
    """A new preset, or a change to one nobody trains, re-runs nothing; a change to the trained preset
    re-runs the study and the training (the tiny project tunes and trains `reference`)."""
    path = tiny_project / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    try:
        params["presets"]["sprint-variant"] = dict(params["presets"]["fast"], dropout=0.0)
        params["presets"]["fast"]["dropout"] = 0.1
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert changed_stages(tiny_project) == set()
        params["presets"]["reference"]["dropout"] = 0.1
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert changed_stages(tiny_project) == {"tune", "train"}
    finally:
        path.write_text(original)
    assert changed_stages(tiny_project) == set()


def test_evaluate_param_reruns_only_evaluate_without_a_duplicate_version(tiny_project):
    params_path = tiny_project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["misclassified_shown"] = 12
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc("repro", project=tiny_project)
    finally:
        params_path.write_text(original)
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'evaluate':"]
    assert len(mlflow_client(tiny_project).search_model_versions("name='mnist-cnn'")) == 1
    dvc("repro", project=tiny_project)  # back in step with the original params


def test_training_run_records_its_data_sets_system_metrics_per_class_table_and_input_example(tiny_project, tmp_path):
    """What the MLflow UI shows of a training run: the splits in its Dataset column (train and val from
    train, test from evaluate, with content digests), `system/*` metrics, the per-class scores as one
    table, and the logged model's input example. (Runs after the test that re-runs evaluate on the
    same run, so the table and the test input are also checked not to double.)"""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipeline.core.data import load_split, split_digest
    from pipeline.core.model import model_signature

    client = mlflow_client(tiny_project)
    record = json.loads((tiny_project / "models" / "train_run.json").read_text())
    run = client.get_run(record["run_id"])
    (listed,) = client.search_runs([run.info.experiment_id], f"attributes.run_id = '{run.info.run_id}'")
    for inputs in (run.inputs.dataset_inputs, listed.inputs.dataset_inputs):  # the run page, the runs table
        logged = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset for i in inputs}
        assert sorted(logged) == [("mnist-test", "testing"), ("mnist-train", "training"), ("mnist-val", "validation")]
        for (name, _), dataset in logged.items():
            split_file = tiny_project / "data" / "prepared" / f"{name.removeprefix('mnist-')}.npz"
            assert dataset.digest == split_digest(load_split(split_file))
            assert Path(json.loads(dataset.source)["uri"]) == split_file.resolve()

    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
    assert "test_accuracy" in run.data.metrics and "test_precision_3" not in run.data.metrics
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_class.json", str(tmp_path))).read_text())
    assert table["columns"] == ["digit", "precision", "recall", "f1"]
    assert [row[0] for row in table["data"]] == list(range(10))
    per_class = json.loads((tiny_project / "metrics" / "per_class.json").read_text())
    assert table["data"][3][1] == pytest.approx(per_class["3"]["precision"])

    model_dir = Path(mlflow.artifacts.download_artifacts(record["model_uri"], dst_path=str(tmp_path / "model")))
    assert (model_dir / "input_example.json").is_file()
    logged_model = Model.load(model_dir)
    assert logged_model.signature == model_signature()
    example = np.asarray(logged_model.load_input_example(model_dir)["pixels"])
    val = load_split(tiny_project / "data" / "prepared" / "val.npz")
    assert example.shape == (3, 28, 28, 1) and np.array_equal(example[..., 0], val.x[:3])  # real digits
    probabilities = mlflow.pyfunc.load_model(record["model_uri"]).predict(example.astype(np.float32))
    assert np.asarray(probabilities).shape == (3, 10)  # the example passes the signature's checks


def test_info_prints_absolute_locations(tiny_project):
    lines = run([sys.executable, "-m", "pipeline", "info"], tiny_project).stdout.splitlines()
    info = dict(line.split(": ", 1) for line in lines)
    assert info["tracking_uri"] == f"sqlite:///{tiny_project / 'mlruns' / 'mlflow.db'}"
    assert info["registered_model"] == "mnist-cnn"
    assert info["study_storage"] == f"sqlite:///{tiny_project / 'studies' / 'optuna.db'}"
    assert all(os.path.isabs(info[f"paths.{k}"]) for k in ("raw", "model", "metrics", "best_params", "tune_summary"))


def test_tracking_uri_env_overrides_the_store(tiny_project, tmp_path):
    env = project_env(tiny_project) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pipeline", "info"], cwd=tiny_project, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert f"tracking_uri: sqlite:///{tmp_path / 'other.db'}" in out


def test_study_trials_are_nested_mlflow_runs(tiny_project):
    client = mlflow_client(tiny_project)
    experiment = client.get_experiment_by_name("mnist")
    studies = client.search_runs([experiment.experiment_id], "tags.`mnist.run_kind` = 'tune-study'")
    trials = client.search_runs([experiment.experiment_id], "tags.`mnist.run_kind` = 'tune-trial'")
    assert len(studies) == 1 and len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {studies[0].info.run_id}
    assert {t.data.tags["optuna.state"] for t in trials} <= {"COMPLETE", "PRUNED"}
    assert "best_val_accuracy" in studies[0].data.metrics
    figures = {a.path for a in client.list_artifacts(studies[0].info.run_id, "figures")}
    assert "figures/optimization_history.png" in figures
    best = json.loads((tiny_project / "models" / "best_params.json").read_text())
    assert best["base_preset"] == "reference" and set(best["params"]) <= {"learning_rate", "dropout", "batch_size"}
    summary = json.loads((tiny_project / "metrics" / "tune.json").read_text())
    assert summary["trials"]["COMPLETE"] >= 1 and summary["best_trial"] == best["best_trial"]
    assert summary["baseline_value"] is not None  # trial 0 is the untuned preset


def test_sqlite_store_is_not_a_dvc_output(tiny_project):
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    outs = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    assert not any(path.startswith(("mlruns", "studies")) for path in outs)
    with sqlite3.connect(tiny_project / "mlruns" / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] >= 4


def test_second_clone_pulls_instead_of_recomputing(tiny_project, tmp_path):
    import subprocess

    remote = tmp_path / "remote"
    dvc("remote", "modify", "--local", "store", "url", str(remote), project=tiny_project)
    dvc("push", project=tiny_project)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "add", "-A"], cwd=tiny_project, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline results"], cwd=tiny_project, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tiny_project), str(clone)], check=True)
    dvc("remote", "modify", "--local", "store", "url", str(remote), project=clone)
    dvc("pull", project=clone)
    assert (clone / "models" / "model.keras").read_bytes() == (tiny_project / "models" / "model.keras").read_bytes()
    result = dvc("repro", project=clone)
    assert "Running stage" not in result.stdout  # everything came from the remote


def test_exp_run_tags_the_run_and_the_version_with_the_experiment(tiny_project, tmp_path):
    """`dvc exp run --temp -S ...` trains a variant without touching the workspace; its MLflow run and
    registered version both name the DVC experiment (here in a store of its own, so the shared
    registry keeps its one version). The variant is an ensemble of two members (`train.members`):
    one model, registered, hash-checked and served like any other."""
    import subprocess

    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "add", "-A"], cwd=tiny_project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline for an experiment"], cwd=tiny_project)  # may be a no-op
    params_before = (tiny_project / "params.yaml").read_text()
    store = f"sqlite:///{tmp_path / 'exp.db'}"
    env = project_env(tiny_project) | {"MLFLOW_TRACKING_URI": store}
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "one-epoch",
                             "-S", "train.epochs=1", "-S", "train.members=2"], cwd=tiny_project, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'train':", "Running stage 'evaluate':"]

    assert "one-epoch" in dvc("exp", "list", "--name-only", project=tiny_project).stdout.split()
    assert (tiny_project / "params.yaml").read_text() == params_before  # --temp left the workspace alone
    assert "Data and pipelines are up to date" in dvc("status", project=tiny_project).stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("mnist")
    (train_run,) = client.search_runs([experiment.experiment_id], "tags.`mnist.run_kind` = 'train'")
    assert train_run.data.tags["dvc_exp_name"] == "one-epoch"
    assert train_run.data.params["train.epochs"] == "1"
    assert len(client.get_metric_history(train_run.info.run_id, "val_accuracy")) == 1
    assert train_run.data.params["train.members"] == "2"
    assert {"member2/val_accuracy", "ensemble_val_accuracy"} <= set(train_run.data.metrics)
    (version,) = client.search_model_versions("name='mnist-cnn'")
    assert version.run_id == train_run.info.run_id
    assert version.tags["dvc_exp_name"] == "one-epoch"
    assert version.tags["dvc_exp_baseline_rev"] == train_run.data.tags["dvc_exp_baseline_rev"]
    assert version.tags["git_commit"] == train_run.data.tags["mlflow.source.git.commit"] != "unknown"
    assert version.tags["params_hash"] == train_run.data.tags["params_hash"]
    assert client.get_model_version_by_alias("mnist-cnn", "champion").version == version.version
    assert len(version.tags["onnx_sha256"]) == 64 and len(version.tags["keras_sha256"]) == 64
    # (evaluate ran the ensemble's ONNX copy on the whole test split against Keras before registering it)
    listing = subprocess.run([sys.executable, "-m", "pipeline", "registry"], cwd=tiny_project, env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "dvc_exp" in listing.splitlines()[0] and "one-epoch" in listing


def output_bytes(project) -> dict[str, bytes]:
    """Every file the stages wrote (data, models, metrics, figures), by path."""
    return {str(path.relative_to(project)): path.read_bytes()
            for folder in ("data", "models", "metrics", "figures") for path in sorted((project / folder).rglob("*"))
            if path.is_file()}


@pytest.mark.parametrize(("section", "change", "stage", "named"), [
    ("fetch", {"sources": ["kears"]}, "fetch", "fetch.sources"),
    ("preprocess", {"val_size": 70000}, "preprocess", "preprocess.val_size"),
    ("tune", {"space": {"dropout": {"low": 0.6, "high": 0.1}}}, "tune", "tune.space.dropout"),
    ("train", {"epohcs": 3}, "train", "train.epohcs"),
    ("evaluate", {"batch_size": 0}, "evaluate", "evaluate.batch_size"),
])
def test_refused_stage_under_dvc_repro_keeps_every_output(tiny_project, section, change, stage, named):
    """`dvc repro` deletes a stage's outputs before it runs the stage unless they are `persist: true`:
    a stage that refuses a bad param must find, and leave, every output byte for byte as it was."""
    path = tiny_project / "params.yaml"
    original = path.read_text()
    before = output_bytes(tiny_project)
    params = yaml.safe_load(original)
    params[section].update(change)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc("repro", project=tiny_project, check=False)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == [f"Running stage '{stage}':"], result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert output_bytes(tiny_project) == before
    assert changed_stages(tiny_project) == set()
