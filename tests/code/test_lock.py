"""The committed dvc.lock matches the committed code and params, so a fresh clone's `dvc status`
blames nothing but the missing data: changing a stage's code or params without re-running (or
`dvc commit`-ing) it fails here."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def git_tracked() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return set(listed.split("\n")) - {""}


def is_tracked(path: str, tracked: set[str]) -> bool:
    """A tracked file, or a folder holding tracked files."""
    return path in tracked or any(name.startswith(f"{path.rstrip('/')}/") for name in tracked)


def stale_dependencies(status: dict, tracked: set[str]) -> dict[str, object]:
    """From `dvc status --json`: git-tracked deps (code, params.yaml keys, tracked data) that changed."""
    stale = {}
    for stage, changes in status.items():
        for change in changes:
            for path, state in (change.get("changed deps", {}) if isinstance(change, dict) else {}).items():
                if is_tracked(path, tracked) and (isinstance(state, dict) or state in ("modified", "new")):
                    stale[f"{stage}: {path}"] = state
    return stale


def test_lock_records_the_current_code_and_params():
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stale = stale_dependencies(json.loads(result.stdout or "{}"), git_tracked())
    assert stale == {}, ("dvc.lock records older versions of these; run `dvc repro` (or `dvc commit` when the "
                         f"outputs are truly unchanged) and commit dvc.lock: {stale}")


def test_stale_dependencies_reads_dvc_status_output():
    """The reader itself: missing data is fine; modified code or params are not."""
    status = {"train": [{"changed deps": {"pipeline/train.py": "modified", "data/prepared/train.npz": "deleted",
                                          "params.yaml": {"train.epochs": "modified"}}},
                        {"changed outs": {"models/model.keras": "deleted"}}],
              "fetch": [{"changed outs": {"data/raw/mnist.npz": "deleted"}}]}
    tracked = {"pipeline/train.py", "params.yaml", "tests/handwriting/labels.csv"}
    assert stale_dependencies(status, tracked) == {"train: pipeline/train.py": "modified",
                                                   "train: params.yaml": {"train.epochs": "modified"}}
    assert stale_dependencies({"evaluate": [{"changed deps": {"tests/handwriting": "modified"}}]}, tracked)
