"""Promotion locks: two racing promotions of one model always leave exactly one champion.

A PostgreSQL advisory lock named by `promote.lock` serialises promotions across machines; for the
embedded store only, a file lock in the project's tracking folder serialises them on this machine.
"""

from __future__ import annotations

import contextlib
import hashlib

from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.core.paths import project_root
from pipeline.core.tracking import STORE_DIR, is_remote, registry_uri


LOCK_TIMEOUT_S = 120.0  # how long a promotion waits for another one of the same model to end


def is_shared_store(uri: str) -> bool:
    """A registry other machines can reach (a tracking server, a database server): a file lock cannot
    exclude their promotions. SQLite files and local folders are this machine's."""
    return is_remote(uri) or ("://" in uri and not uri.startswith(("sqlite:", "file:")))


def require_promotion_lock(lock_url: str) -> None:
    """Refuse, before anything is written, to promote against a shared registry without a shared lock."""
    uri = registry_uri()
    if not lock_url and is_shared_store(uri):
        raise PipelineError(f"the model registry {redact(uri)} is shared, so promotions need a lock every machine "
                            "shares: set promote.lock in params.yaml to a PostgreSQL URL (e.g. "
                            "postgresql://user@db-host/mlflow), or unset MLFLOW_TRACKING_URI to use the embedded store")


def advisory_lock_key(model_name: str) -> int:
    """The 64-bit key of a model's promotion lock (PostgreSQL advisory locks are numbered)."""
    digest = hashlib.sha256(f"mnist-pipeline promotion {model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def advisory_lock(lock_url: str, model_name: str, timeout_s: float):
    """A PostgreSQL session advisory lock: held while this connection lives, so a killed holder
    releases it at once."""
    import psycopg

    conninfo = lock_url.replace("postgresql+psycopg://", "postgresql://", 1).replace("postgresql+psycopg2://", "postgresql://", 1)
    key = advisory_lock_key(model_name)
    try:
        connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=10,
                                     application_name=f"mnist-pipeline promotion of {model_name}")
    except psycopg.Error as error:
        raise PipelineError(f"the promotion lock {redact(lock_url)} is unreachable ({type(error).__name__}: "
                            f"{redact(first_line(error))}); start the database or fix promote.lock") from None
    with connection:
        try:
            connection.execute(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'")
            connection.execute("SELECT pg_advisory_lock(%s)", (key,))
        except psycopg.errors.LockNotAvailable:
            raise PipelineError(f"another promotion of {model_name} held the lock in {redact(lock_url)} for "
                                f"{timeout_s:.0f} s; retry when it ends") from None
        except psycopg.Error as error:
            raise PipelineError(f"the promotion lock {redact(lock_url)} failed ({type(error).__name__}: "
                                f"{redact(first_line(error))}); retry when the database answers") from None
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost connection has released the lock already
                connection.execute("SELECT pg_advisory_unlock(%s)", (key,))


@contextlib.contextmanager
def promotion_lock(model_name: str, lock_url: str = "", timeout_s: float = LOCK_TIMEOUT_S):
    """Serialise alias changes of one model: across machines with `lock_url` (a PostgreSQL advisory
    lock), else across processes on this machine (a file lock, refused for a shared registry)."""
    if lock_url:
        with advisory_lock(lock_url, model_name, timeout_s):
            yield
        return
    require_promotion_lock(lock_url)
    from filelock import FileLock, Timeout

    lock_dir = project_root() / STORE_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f".{model_name}.promotion.lock"))
    try:
        with lock.acquire(timeout=timeout_s):
            yield
    except Timeout:
        raise PipelineError(f"another promotion of {model_name} holds {lock.lock_file}; retry when it ends") from None
