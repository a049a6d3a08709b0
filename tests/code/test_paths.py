"""Output paths are checked before anything is touched, and outputs are swapped in whole."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.paths import clean_staging, require_safe_paths, staged_outputs
from tests.helpers import params_with


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A project folder nested in a scratch folder made for the test: `..` lands in scratch."""
    project = tmp_path / "scratch" / "project"
    project.mkdir(parents=True)
    (tmp_path / "scratch" / "beside.txt").write_text("a user's file beside the project")
    monkeypatch.chdir(project)
    return project


@pytest.mark.parametrize(("value", "problem"), [
    ("", "is empty"), (".", "is the working folder itself"), ("..", "is outside the working folder"),
    ("../beside.txt", "is outside the working folder"), ("/etc/passwd", "is outside the working folder"),
    ("data", "paths.raw"), ("data/raw/mnist.npz", "paths.raw"),
    ("tests/handwriting/0001_1.png", "paths.handwriting_set"),
])
def test_dangerous_output_paths_are_refused_with_the_key(scratch, value, problem):
    paths = params_with({"paths": {"model": value}}).paths
    with pytest.raises(PipelineError) as error:
        paths.require_safe()
    message = str(error.value)  # an overlap names both keys
    assert "paths.model" in message and problem in message and "\n" not in message


def test_the_default_paths_are_safe(scratch):
    params_with().paths.require_safe()


def test_an_input_may_live_outside_the_project(scratch):
    require_safe_paths({"model": "models/model.keras", "pictures": "/srv/pictures"}, inputs=frozenset({"pictures"}))


def test_outputs_are_swapped_in_together_or_not_at_all(scratch):
    (scratch / "models").mkdir()
    (scratch / "models" / "model.txt").write_text("old model")
    with pytest.raises(OSError, match="disk full"):
        with staged_outputs() as staging:
            staging.path("models/model.txt").write_text("new model")
            np.savez(staging.path("data/split.npz"), x=np.zeros(3))
            raise OSError("disk full")
    assert (scratch / "models" / "model.txt").read_text() == "old model"
    assert not (scratch / "data" / "split.npz").exists()
    assert sorted(p.name for p in (scratch / "models").iterdir()) == ["model.txt"]  # no staging folder left
    with staged_outputs() as staging:
        staging.path("models/model.txt").write_text("new model")
        np.savez(staging.path("data/split.npz"), x=np.ones(3))
    assert (scratch / "models" / "model.txt").read_text() == "new model"
    np.testing.assert_array_equal(np.load(scratch / "data" / "split.npz")["x"], np.ones(3))
    assert sorted(p.name for p in (scratch / "models").iterdir()) == ["model.txt"]


def test_a_folder_in_an_outputs_place_is_refused_and_kept(scratch):
    (scratch / "models").mkdir()
    (scratch / "models" / "keep.txt").write_text("keep")
    with pytest.raises(PipelineError, match="is a folder"):
        with staged_outputs() as staging:
            staging.path("models").write_text("would replace the folder")
    assert (scratch / "models" / "keep.txt").read_text() == "keep"


def test_leftovers_of_a_killed_stage_are_cleaned_and_nothing_else(scratch):
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    models = scratch / "models"
    models.mkdir()
    (models / f".staging-{gone.pid}-abc").mkdir()
    (models / f".staging-{gone.pid}-abc" / "model.keras").write_text("half")
    (models / f".staging-{os.getpid()}-live").mkdir()  # a running stage's: kept
    (models / ".staging-note.txt").write_text("a user's file, not a staging folder")
    with staged_outputs() as staging:  # the next run cleans before it stages
        staging.path("models/model.keras").write_text("new")
    assert sorted(p.name for p in models.iterdir()) == [f".staging-{os.getpid()}-live", ".staging-note.txt", "model.keras"]
    assert clean_staging(models) == []
