"""scripts/setup fails early and clearly: it refuses a Python older than 3.11 before creating anything,
and rebuilds a .venv made by another Python, putting the old one back when the install fails.

The real script runs from a scratch copy of the project with pip cut off from every index, so
nothing is downloaded; a stand-in interpreter reports whatever version a test needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

HERE_VERSION = "%d.%d.%d" % sys.version_info[:3]
HERE_EXECUTABLE = os.path.realpath(sys.executable)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A scratch copy of what scripts/setup reads."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts" / "setup", root / "scripts" / "setup")
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy2(REPO_ROOT / name, root / name)
    return root


def fake_python(directory: Path, version: tuple[int, int, int], executable: str, venv_fails: bool = False) -> Path:
    """An interpreter that claims to be `version` at `executable`: it runs the real one with
    sys.version_info and sys.executable replaced, so it answers whatever the script asks with -c.
    With venv_fails, `-m venv DIR` leaves a half-made DIR and fails, as Debian's python3 without
    python3-venv does."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"python{version[0]}.{version[1]}"
    patch = ("import collections, sys; "
             "V = collections.namedtuple('version_info', 'major minor micro releaselevel serial'); "
             f"sys.version_info = V({version[0]}, {version[1]}, {version[2]}, 'final', 0); "
             f"sys.version = '{version[0]}.{version[1]}.{version[2]}'; sys.executable = {executable!r}; "
             "code = sys.argv.pop(1); exec(compile(code, '-c', 'exec'))")
    path.write_text(f"""#!/bin/sh
if [ "$1" = -c ]; then shift; exec {sys.executable} -c "{patch}" "$@"; fi
if [ "$1" = --version ] || [ "$1" = -V ]; then echo "Python {version[0]}.{version[1]}.{version[2]}"; exit 0; fi
{'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; echo "ensurepip is not available" >&2; exit 1; fi' if venv_fails else ''}
exec {sys.executable} "$@"
""")
    path.chmod(0o755)
    return path


def fake_venv(root: Path, version: str, executable: str) -> Path:
    """A .venv whose pyvenv.cfg names another interpreter; bin/python is a harmless stub."""
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(executable)}\ninclude-system-site-packages = false\n"
                                     f"version = {version}\nexecutable = {executable}\n")
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / "MARKER").write_text("the old venv\n")
    return venv


def run_setup(root: Path, python: Path | str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(python),
           # no index, no find-links, no config: any pip call fails at once instead of downloading
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([str(root / "scripts" / "setup"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)


def test_refuses_python_310_with_one_line_before_creating_anything(project, tmp_path):
    python = fake_python(tmp_path / "bin", (3, 10, 12), "/usr/bin/python3.10")
    before = sorted(p.name for p in project.iterdir())

    result = run_setup(project, python)

    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "3.11" in lines[0] and "3.10.12" in lines[0] and "PYTHON=" in lines[0]
    assert not (project / ".venv").exists()
    assert sorted(p.name for p in project.iterdir()) == before


def test_check_venv_reports_a_venv_made_by_another_python(project):
    venv = fake_venv(project, "3.10.13", "/opt/python3.10/bin/python3.10")
    cfg = (venv / "pyvenv.cfg").read_text()

    result = run_setup(project, sys.executable, "--check-venv")

    assert result.returncode == 3, result.stdout + result.stderr
    assert "made by Python 3.10.13" in result.stdout and "rebuild" in result.stdout
    assert (venv / "pyvenv.cfg").read_text() == cfg and (venv / "MARKER").exists()  # changed nothing


def test_check_venv_reports_another_executable_of_the_same_version(project):
    fake_venv(project, HERE_VERSION, "/somewhere/else/bin/python3")

    result = run_setup(project, sys.executable, "--check-venv")

    assert result.returncode == 3, result.stdout + result.stderr
    assert "/somewhere/else/bin/python3" in result.stdout and "rebuild" in result.stdout


def test_check_venv_accepts_a_venv_made_by_the_chosen_python(project):
    fake_venv(project, HERE_VERSION, HERE_EXECUTABLE)

    result = run_setup(project, sys.executable, "--check-venv")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "matches" in result.stdout


def test_rebuild_puts_the_old_venv_back_when_the_install_fails(project):
    """The old .venv is moved aside, not deleted, until the new one is installed: here pip has no
    index, so the install fails and the old one comes back; nothing else is left behind."""
    fake_venv(project, "3.10.13", "/opt/python3.10/bin/python3.10")

    result = run_setup(project, sys.executable)

    assert result.returncode != 0
    assert "rebuilding" in result.stdout
    assert "putting the previous .venv back" in result.stderr
    assert (project / ".venv" / "MARKER").read_text() == "the old venv\n"
    assert "version = 3.10.13" in (project / ".venv" / "pyvenv.cfg").read_text()
    assert sorted(p.name for p in project.iterdir()) == [".venv", "pyproject.toml", "requirements.lock", "scripts"]


def test_a_failed_venv_creation_is_removed_and_the_old_venv_put_back(project, tmp_path):
    python = fake_python(tmp_path / "bin", (3, 12, 1), "/usr/bin/python3.12", venv_fails=True)
    fake_venv(project, "3.10.13", "/opt/python3.10/bin/python3.10")

    result = run_setup(project, python)

    assert result.returncode != 0
    assert "python3-venv" in result.stderr and "putting the previous .venv back" in result.stderr
    assert (project / ".venv" / "MARKER").exists()
    assert sorted(p.name for p in project.iterdir()) == [".venv", "pyproject.toml", "requirements.lock", "scripts"]

    shutil.rmtree(project / ".venv")
    result = run_setup(project, python)

    assert result.returncode != 0 and "python3-venv" in result.stderr
    assert not (project / ".venv").exists()  # the half-made one is gone, so the next run starts clean


def test_never_moves_a_venv_that_is_a_link(project, tmp_path):
    elsewhere = fake_venv(tmp_path / "elsewhere", "3.10.13", "/opt/python3.10/bin/python3.10")
    (project / ".venv").symlink_to(elsewhere)

    result = run_setup(project, sys.executable)

    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1 and "not a virtual environment" in result.stderr
    assert (project / ".venv").is_symlink() and (elsewhere / "MARKER").exists()
