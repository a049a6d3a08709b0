"""Bad input through the real stage commands: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import copy_project
from tests.e2e.conftest import dvc, run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, mnist_npz):
    """A copy with prepared data, fetched from a local file (the first source)."""
    root = copy_project(tmp_path_factory.mktemp("bad"))
    tiny_params(root / "params.yaml", **{"fetch.local_path": str(mnist_npz), "fetch.sources": ["local"]})
    for stage in ("pipeline.fetch", "pipeline.preprocess"):
        run([sys.executable, "-m", stage], root)
    return root


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr
    return last


def with_params(project, change) -> str:
    path = project / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p["train"].update(epohcs=3), "train.epohcs: unknown key"),
        (lambda p: p["train"].update(epochs="ten"), "train.epochs: Input should be a valid integer"),
        (lambda p: p["preprocess"].update(val_size=-1), "preprocess.val_size"),
        (lambda p: p["tune"]["space"].update(dropout={"low": 0.6, "high": 0.1}), "tune.space.dropout"),
    ],
)
def test_bad_params_fail_before_work(project, change, expected):
    original = with_params(project, change)
    try:
        for stage in ("pipeline.preprocess", "pipeline.train", "pipeline.tune", "pipeline.evaluate"):
            line = one_error_line(run([sys.executable, "-m", stage], project, check=False))
            assert expected in line and "params.yaml" in line
    finally:
        (project / "params.yaml").write_text(original)


def test_local_file_with_wrong_content_lists_sources_and_fix(project, tmp_path):
    wrong = tmp_path / "mnist.npz"
    with np.load(project / "data" / "raw" / "mnist.npz") as data:
        arrays = dict(data)
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] ^= 1
    np.savez(wrong, **arrays)
    before = (project / "data" / "raw" / "mnist.npz").read_bytes()
    original = with_params(project, lambda p: p["fetch"].update(local_path=str(wrong), sources=["local"]))
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.fetch"], project, check=False))
    finally:
        (project / "params.yaml").write_text(original)
    assert "no MNIST source worked" in line and "content hash" in line and "fetch.local_path" in line
    assert (project / "data" / "raw" / "mnist.npz").read_bytes() == before  # untouched


def test_truncated_npz_is_reported(project, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((project / "data" / "raw" / "mnist.npz").read_bytes()[:5000])
    original = with_params(project, lambda p: p["fetch"].update(local_path=str(truncated), sources=["local"]))
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.fetch"], project, check=False))
    finally:
        (project / "params.yaml").write_text(original)
    assert "not a readable .npz" in line


def test_missing_inputs_name_the_stage_to_run(project, tmp_path):
    moved = tmp_path / "prepared"
    shutil.move(project / "data" / "prepared", moved)
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.tune"], project, check=False))
        assert "data/prepared/train.npz is missing; run `dvc repro preprocess` first" in line
    finally:
        shutil.move(moved, project / "data" / "prepared")
    line = one_error_line(run([sys.executable, "-m", "pipeline.evaluate"], project, check=False))
    assert "train_run.json is missing; run `dvc repro train` first" in line


def test_damaged_prepared_split_is_reported(project):
    split = project / "data" / "prepared" / "val.npz"
    original = split.read_bytes()
    split.write_bytes(original[: len(original) // 2])
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.tune"], project, check=False))
    finally:
        split.write_bytes(original)
    assert "val.npz is damaged" in line and "dvc repro -f preprocess" in line


def test_damaged_best_params_is_reported(project):
    best = project / "models" / "best_params.json"
    best.parent.mkdir(exist_ok=True)
    best.write_text('{"params": ')
    line = one_error_line(run([sys.executable, "-m", "pipeline.train"], project, check=False))
    assert "best_params.json is damaged" in line and "dvc repro -f tune" in line
    assert not (project / "models" / "model.keras").exists()


def test_unreachable_tracking_server_fails_before_training(project):
    best = project / "models" / "best_params.json"
    best.parent.mkdir(exist_ok=True)
    best.write_text('{"base_preset": "reference", "params": {}}')
    import subprocess

    from tests.e2e.conftest import project_env

    env = project_env(project) | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=300)
    line = one_error_line(result)
    assert "MLflow tracking store http://127.0.0.1:9 is unreachable" in line
    assert "Epoch 1" not in result.stdout
    assert not (project / "models" / "model.keras").exists()


def test_damaged_model_file_is_reported(project):
    models = project / "models"
    models.mkdir(exist_ok=True)
    (models / "train_run.json").write_text('{"run_id": "0", "model_uri": "models:/m-0"}')
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "train_history.csv").write_text("epoch,loss,accuracy,val_loss,val_accuracy,learning_rate\n")
    (models / "model.keras").write_bytes(b"PK\x03\x04 not really a keras archive")
    line = one_error_line(run([sys.executable, "-m", "pipeline.evaluate"], project, check=False))
    assert "model.keras cannot be loaded" in line and "dvc repro -f train" in line
    assert not (project / "metrics" / "evaluate.json").exists()


def test_garbled_params_file_is_reported(project):
    path = project / "params.yaml"
    original = path.read_text()
    path.write_text(original.replace("train:", "train: [", 1))
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.train"], project, check=False))
    finally:
        path.write_text(original)
    assert "params.yaml is not valid YAML at line" in line


def test_dvc_repro_with_bad_param_exits_non_zero(project):
    original = with_params(project, lambda p: p["evaluate"].update(batch_size=0))
    try:
        result = dvc("repro", "evaluate", project=project, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode != 0
    assert "evaluate.batch_size: Input should be greater than 0" in result.stdout + result.stderr


def test_dashboard_without_a_study_database_names_the_command_to_run(project):
    original = with_params(project, lambda p: p["tune"].update(storage="sqlite:///no-study-here/optuna.db"))
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline", "dashboard"], project, check=False))
    finally:
        (project / "params.yaml").write_text(original)
    assert f"{project / 'no-study-here' / 'optuna.db'}" in line and "dvc repro -f tune" in line
    assert not (project / "no-study-here").exists()  # the dashboard created no empty database


@pytest.fixture(scope="module")
def nested_project(tmp_path_factory, mnist_npz):
    """A project inside a scratch folder made for these tests, with a file beside it: a `..` that escapes
    lands in scratch, never in the checkout or the temporary folder."""
    scratch = tmp_path_factory.mktemp("scratch")
    (scratch / "beside.txt").write_text("a user's file next to the project")
    project = copy_project(scratch / "project")
    tiny_params(project / "params.yaml")
    (project / "data" / "raw").mkdir(parents=True)
    shutil.copy2(mnist_npz, project / "data" / "raw" / "mnist.npz")
    return project


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` but git's and DVC's own bookkeeping."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and "/.git/" not in f"/{name}" and "/.dvc/tmp/" not in f"/{name}":
            files[name] = path.read_bytes()
    return files


@pytest.mark.parametrize("value", ["..", "", ".", "data"])
def test_a_dangerous_output_folder_is_refused_and_nothing_is_deleted(nested_project, value):
    scratch = nested_project.parent
    before = snapshot(scratch)
    original = with_params(nested_project, lambda p: p["paths"].update(train_split=value))
    try:
        line = one_error_line(run([sys.executable, "-m", "pipeline.preprocess"], nested_project, check=False))
        assert "paths.train_split" in line and "params.yaml" in line
        refused = dvc("repro", "preprocess", project=nested_project, check=False)  # DVC's own checks refuse it too
        assert refused.returncode != 0
    finally:
        (nested_project / "params.yaml").write_text(original)
    after = snapshot(scratch)
    assert {name: after.get(name) for name in before} == before  # every file beside and inside kept, unchanged
