"""Follow an alias: a server started on `models:/<name>@champion` serves whatever version the alias
names now, not the one it started with.

Every `refresh_s` seconds a background thread reads the alias (one registry call). When it names
another version, that version is loaded and hash-checked beside the one serving (`load_classifier`),
then swapped in with one assignment: a request in flight finishes on the model it started with, and
none fails or waits. A version that cannot be loaded (a changed file, a missing hash) is refused in
one log line and the current one keeps serving; a registry that does not answer is logged once per
outage. Every answer names the version that gave it (`Answers.version`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.serving.served import Answers, ServedModel

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 30.0
Loader = Callable[[str], ServedModel]


def alias_of(uri: str) -> tuple[str, str] | None:
    """(name, alias) of a `models:/<name>@<alias>` URI; None for anything else (nothing to follow)."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, _, alias = uri.removeprefix("models:/").partition("@")
    return name, alias


class AliasFollower:
    """A ServedModel-like object whose model follows `uri`'s alias (see the module docstring)."""

    def __init__(self, uri: str, refresh_s: float, load: Loader,
                 adapt: Callable[[ServedModel], ServedModel] = lambda model: model) -> None:
        self.uri = uri
        self.refresh_s = refresh_s
        self.load = lambda target: adapt(load(target))
        self.model = self.load(uri)
        self.alias = alias_of(uri)
        self.refused: str | None = None  # the last version refused, not tried again until the alias moves
        self.registry_down = False
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # the ServedModel interface, on whichever model serves now
    def answer(self, pixels: np.ndarray) -> Answers:
        return self.model.answer(pixels)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.probabilities(pixels)

    @property
    def version(self) -> str | None:
        return self.model.version

    @property
    def has_verdict(self) -> bool:
        return self.model.has_verdict

    @property
    def missing_verdict(self) -> str:
        return self.model.missing_verdict

    def start(self) -> None:
        if self.alias is None or self.refresh_s <= 0 or self.thread is not None:
            return
        log.info("following %s: checked every %g s", self.uri, self.refresh_s)
        self.thread = threading.Thread(target=self.run, name="alias-follower", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        while not self.stopping.wait(self.refresh_s):
            self.check()

    def named_version(self) -> str | None:
        """The version the alias names now, or None when the registry cannot say (logged once)."""
        import mlflow

        name, alias = self.alias
        try:
            version = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except Exception as error:  # any store failure: keep serving what we have
            if not self.registry_down:
                log.warning("cannot read %s (%s); still serving version %s", self.uri, redact(first_line(error)),
                            self.model.version)
            self.registry_down = True
            return None
        if self.registry_down:
            log.info("the registry answers again: %s names version %s", self.uri, version)
        self.registry_down = False
        return version

    def check(self) -> None:
        """One look at the alias; switch to the version it names when that one loads."""
        version = self.named_version()
        if version is None or version == self.model.version or version == self.refused:
            return
        name, _ = self.alias
        try:
            new = self.load(f"models:/{name}/{version}")
        except PipelineError as error:
            log.error("%s moved to version %s, which is refused: %s; still serving version %s", self.uri, version,
                      error, self.model.version)
            self.refused = version
            return
        old, self.model, self.refused = self.model.version, new, None
        log.info("%s moved: now serving version %s (was %s)", self.uri, version, old)

