"""MLflow model registry: versions of `mnist-cnn`, `challenger`/`champion` aliases, promotion.

Promotion is one pure decision (`decide_promotion`) plus small adapters. Aliases, never the
deprecated stages. A lock serialises promotions so two racing promotions always leave exactly one
champion, chosen on fresh data: a PostgreSQL advisory lock named by `promote.lock` that every machine
shares, or, for the embedded store only, a file lock in the project's `mlruns/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

from pipeline.core.errors import PipelineError, exit_on_user_error, redact
from pipeline.core.paths import project_root

log = logging.getLogger("pipeline.core.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_MODEL_NAME = "mnist-cnn"  # what serving assumes outside a project (params.yaml names it inside)
CHAMPION_HISTORY_TAG = "champion_history"  # on the model: versions that held champion, oldest first


def champion_uri(params_file: str = "params.yaml") -> str:
    """The champion of the project's registered model (`tracking.registered_model` in params.yaml;
    the model's usual name where no params.yaml is at hand, e.g. serving from another folder)."""
    from pipeline.core.config import load_params
    from pipeline.core.paths import resolve_in_project

    path = resolve_in_project(params_file)
    name = load_params(path).tracking.registered_model if path.is_file() else DEFAULT_MODEL_NAME
    return f"models:/{name}@{CHAMPION}"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: float | None
    margin: float

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"


def decide_promotion(candidate_accuracy: float, champion_accuracy: float | None, margin: float) -> Decision:
    """Promote when there is no champion, or the candidate beats it by at least `margin`."""
    if champion_accuracy is None:
        return Decision(True, "no champion yet", candidate_accuracy, None, margin)
    gain = candidate_accuracy - champion_accuracy
    if gain >= margin - 1e-12:
        reason = f"test accuracy {candidate_accuracy:.4f} beats champion {champion_accuracy:.4f} by {gain:+.4f} >= margin {margin}"
        return Decision(True, reason, candidate_accuracy, champion_accuracy, margin)
    reason = f"test accuracy {candidate_accuracy:.4f} vs champion {champion_accuracy:.4f}: gain {gain:+.4f} < margin {margin}"
    return Decision(False, reason, candidate_accuracy, champion_accuracy, margin)


def should_promote(candidate_accuracy: float, champion_accuracy: float | None, margin: float) -> bool:
    return decide_promotion(candidate_accuracy, champion_accuracy, margin).promote


DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_database_server(uri: str, timeout_s: float = 5.0) -> None:
    """A database server that does not answer fails in seconds, instead of after the ~100 s of
    retries MLflow's SQLAlchemy store makes before it gives up."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = DATABASE_PORTS.get(parts.scheme.split("+")[0])
    if port is None or not parts.hostname:
        return
    try:
        socket.create_connection((parts.hostname, parts.port or port), timeout=timeout_s).close()
    except OSError as error:
        raise PipelineError(f"MLflow tracking store {redact(uri)} is unreachable ({error.strerror or type(error).__name__}); "
                            "start the database, or unset MLFLOW_TRACKING_URI to use the embedded store") from None


def client():
    from mlflow import MlflowClient

    from pipeline.core.tracking import configure_tracking, first_line, registry_uri

    uri = configure_tracking()
    check_database_server(registry_uri())
    try:
        return MlflowClient()
    except Exception as error:  # an unreachable database fails here, as sqlalchemy's error
        raise PipelineError(f"MLflow tracking store {uri} is unreachable ({type(error).__name__}: "
                            f"{first_line(error)}); start "
                            "it, or unset MLFLOW_TRACKING_URI to use the embedded store") from None


LOCK_TIMEOUT_S = 120.0  # how long a promotion waits for another one of the same model to end


def is_shared_store(uri: str) -> bool:
    """A registry other machines can reach (a tracking server, a database server): a file lock cannot
    exclude their promotions. SQLite files and local folders are this machine's."""
    from pipeline.core.tracking import is_remote

    return is_remote(uri) or ("://" in uri and not uri.startswith(("sqlite:", "file:")))


def require_promotion_lock(lock_url: str) -> None:
    """Refuse, before anything is written, to promote against a shared registry without a shared lock."""
    from pipeline.core.tracking import registry_uri

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

    from pipeline.core.tracking import first_line

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

    lock_dir = project_root() / "mlruns"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f".{model_name}.promotion.lock"))
    try:
        with lock.acquire(timeout=timeout_s):
            yield
    except Timeout:
        raise PipelineError(f"another promotion of {model_name} holds {lock.lock_file}; retry when it ends") from None


def is_not_found(error: Exception) -> bool:
    """MLflow's answer for a model or alias that does not exist (and only that)."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


def store_failure(action: str, error: Exception) -> PipelineError:
    """One line for a registry that did not answer as it should: nothing is decided on a guess."""
    from pipeline.core.tracking import first_line

    return PipelineError(f"the model registry failed while {action} ({type(error).__name__}: {first_line(error)}); nothing more "
                         "was changed: retry when the tracking store answers")


@contextlib.contextmanager
def registry_calls(action: str):
    """Turn any store error (MLflow's, a database's, a connection's) into `store_failure`."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:  # sqlalchemy, requests and MLflow errors alike: none of them means "absent"
        raise store_failure(action, error) from None


def alias_version(mlflow_client, model_name: str, alias: str):
    """The model version holding `alias`; None only when the store says there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        if is_not_found(error):
            return None
        raise store_failure(f"reading the {alias} alias", error) from None


def find_version_for_run(mlflow_client, model_name: str, run_id: str):
    """An existing version registered from this run (re-evaluating must not add duplicates)."""
    with registry_calls("looking for the run's version"):
        versions = mlflow_client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def register(model_uri: str, model_name: str, run_id: str, tags: dict[str, str]):
    """Register the run's model as a new version (or reuse the run's version), tagging its metrics."""
    import mlflow

    mlflow_client = client()
    version = find_version_for_run(mlflow_client, model_name, run_id)
    with registry_calls("registering the model"):
        if version is None:
            version = mlflow.register_model(model_uri, model_name, tags=tags)
        else:
            for key, value in tags.items():
                mlflow_client.set_model_version_tag(model_name, version.version, key, value)
    return version


def record_decision(mlflow_client, model_name: str, version: str, decision: Decision, extra: dict[str, str]) -> None:
    tags = {
        "validation_status": decision.status,
        "promotion_reason": decision.reason,
        "compared_candidate_accuracy": f"{decision.candidate_accuracy:.6f}",
        "compared_champion_accuracy": "none" if decision.champion_accuracy is None else f"{decision.champion_accuracy:.6f}",
        "promotion_margin": str(decision.margin),
        **extra,
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version, key, value)


def champion_history(mlflow_client, model_name: str) -> list[str]:
    with registry_calls("reading the champion history"):
        tags = mlflow_client.get_registered_model(model_name).tags
    return [v for v in tags.get(CHAMPION_HISTORY_TAG, "").split(",") if v]


def write_aliases(mlflow_client, model_name: str, aliases: dict[str, str], history: list[str] | None = None) -> None:
    """Point `aliases` at their versions, and set the champion history, as one unit.

    The history goes first, so a crash between writes never drops a champion from it. When a write
    fails, the writes before it are undone: champion, challenger and history stay as they were."""
    with registry_calls("reading the aliases"):
        model = mlflow_client.get_registered_model(model_name)
    before_aliases, before_history = dict(model.aliases or {}), (model.tags or {}).get(CHAMPION_HISTORY_TAG)

    def set_history(value):
        if value is None:
            mlflow_client.delete_registered_model_tag(model_name, CHAMPION_HISTORY_TAG)
        else:
            mlflow_client.set_registered_model_tag(model_name, CHAMPION_HISTORY_TAG, value)

    def set_alias(alias, version):
        if version is None:
            mlflow_client.delete_registered_model_alias(model_name, alias)
        else:
            mlflow_client.set_registered_model_alias(model_name, alias, str(version))

    steps = [] if history is None else [(lambda: set_history(",".join(history)), lambda: set_history(before_history))]
    for alias, version in aliases.items():
        previous = before_aliases.get(alias)
        steps.append((lambda a=alias, v=version: set_alias(a, v), lambda a=alias, v=previous: set_alias(a, v)))
    done = []
    try:
        for write, undo in steps:
            write()
            done.append(undo)
    except Exception as error:
        for undo in reversed(done):
            try:
                undo()
            except Exception:  # the store is down: the error below says to retry
                log.warning("could not undo an alias write of %s after a store error", model_name)
        raise store_failure("writing the aliases", error) from None


def champion_writes(mlflow_client, model_name: str, version: str) -> tuple[dict[str, str], list[str] | None]:
    """The champion alias and history that make `version` champion (nothing when it already is)."""
    current = alias_version(mlflow_client, model_name, CHAMPION)
    if current is not None and str(current.version) == str(version):
        return {}, None
    history = champion_history(mlflow_client, model_name)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))
    return {CHAMPION: str(version)}, [*history, str(version)]


def rollback_champion(mlflow_client, model_name: str, lock_url: str = "") -> tuple[str, str]:
    """Move `champion` back to the version that held it before; returns (from, to)."""
    with promotion_lock(model_name, lock_url):
        current = alias_version(mlflow_client, model_name, CHAMPION)
        if current is None:
            raise PipelineError(f"{model_name} has no champion to roll back; promote a version first")
        history = champion_history(mlflow_client, model_name)
        if history and history[-1] == str(current.version):
            history.pop()
        if not history:
            raise PipelineError(f"{model_name} v{current.version} is the first champion; nothing to roll back to")
        previous = history[-1]
        write_aliases(mlflow_client, model_name, {CHAMPION: previous}, history)
        with registry_calls("marking the rolled-back version"):
            mlflow_client.set_model_version_tag(model_name, str(current.version), "validation_status", "rolled_back")
        return str(current.version), previous


def champion_accuracy(mlflow_client, model_name: str, champion, test_digest: str, score) -> float:
    """The champion's test accuracy on the current test data: its tag if measured on the same
    data, else re-scored with `score(model_uri)`."""
    tags = champion.tags or {}
    if tags.get("test_data_sha256") == test_digest and "test_accuracy" in tags:
        return float(tags["test_accuracy"])
    log.info("test data changed since v%s was scored; re-scoring the champion", champion.version)
    accuracy = float(score(f"models:/{model_name}/{champion.version}"))
    with registry_calls("recording the re-scored accuracy"):
        mlflow_client.set_model_version_tag(model_name, champion.version, "test_accuracy", f"{accuracy:.6f}")
        mlflow_client.set_model_version_tag(model_name, champion.version, "test_data_sha256", test_digest)
    return accuracy


MAX_DECISIONS = 3  # a champion that changes under us this often means a promoter outside the lock


def promote(model_name: str, version: str, margin: float, test_digest: str, score, force: bool = False,
            lock_url: str = "") -> Decision:
    """Make `version` the challenger, then champion if it beats the champion by `margin` (or `force`).

    The decision and the metrics compared are written to the version's tags. Under the lock
    (`promotion_lock`) the champion is re-read, so racing promotions each compare against the real
    current champion; after the writes it is read once more, and if it changed meanwhile (a promoter
    that does not share the lock) the decision is taken again. Everything is read and decided before
    the first write; a store error at any call stops with one line (`store_failure`), never with a
    guess that there is no champion.
    """
    mlflow_client = client()
    with promotion_lock(model_name, lock_url):
        from mlflow.exceptions import MlflowException

        try:
            candidate = mlflow_client.get_model_version(model_name, str(version))
        except MlflowException as error:
            if is_not_found(error):
                raise PipelineError(f"{model_name} has no version {version}; list them with "
                                    "`python -m pipeline registry`") from None
            raise store_failure(f"reading version {version}", error) from None
        candidate_accuracy = champion_accuracy(mlflow_client, model_name, candidate, test_digest, score)
        champion = alias_version(mlflow_client, model_name, CHAMPION)
        for _ in range(MAX_DECISIONS):
            decision = decide_and_write(mlflow_client, model_name, str(version), candidate_accuracy, champion,
                                        margin, test_digest, score, force)
            expected = str(version) if decision.promote else None if champion is None else str(champion.version)
            now = champion_after_write(mlflow_client, model_name)
            if now is None or now == (expected or "none"):
                break
            log.warning("the champion of %s changed to v%s while v%s was promoted; deciding again", model_name, now, version)
            champion = alias_version(mlflow_client, model_name, CHAMPION)
        else:
            raise PipelineError(f"the champion of {model_name} kept changing while v{version} was promoted: a promoter "
                                "does not share this lock; give every machine the same promote.lock, then retry")
    log.info("v%s %s: %s", version, decision.status, decision.reason)
    return decision


def decide_and_write(mlflow_client, model_name: str, version: str, candidate_accuracy: float, champion, margin: float,
                     test_digest: str, score, force: bool) -> Decision:
    """Decide `version` against `champion` (None: there is none), record the decision, write the aliases."""
    if champion is not None and str(champion.version) == version:
        decision = Decision(True, "already champion", candidate_accuracy, candidate_accuracy, margin)
    else:
        rival = None if champion is None else champion_accuracy(mlflow_client, model_name, champion, test_digest, score)
        decision = decide_promotion(candidate_accuracy, rival, margin)
        if force and not decision.promote:
            decision = Decision(True, f"promoted by hand over: {decision.reason}", candidate_accuracy, rival, margin)
    extra = {"compared_champion_version": "none" if champion is None else str(champion.version)}
    aliases, history = champion_writes(mlflow_client, model_name, version) if decision.promote else ({}, None)
    with registry_calls("recording the decision"):
        record_decision(mlflow_client, model_name, version, decision, extra)
    write_aliases(mlflow_client, model_name, {**aliases, CHALLENGER: version}, history)
    return decision


def champion_after_write(mlflow_client, model_name: str) -> str | None:
    """The champion's version ("none" when there is none) read back after a promotion's writes; None
    when the store cannot say (the writes stand: they were complete)."""
    try:
        holder = alias_version(mlflow_client, model_name, CHAMPION)
    except PipelineError as error:
        log.warning("could not read the champion back to check for a concurrent change: %s", error)
        return None
    return "none" if holder is None else str(holder.version)


def aliases_by_version(mlflow_client, model_name: str) -> dict[str, list[str]] | None:
    """{version: [aliases]} of a registered model (sorted); None when the model does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow_client.get_registered_model(model_name)
    except MlflowException as error:
        if is_not_found(error):
            return None
        raise store_failure("reading the aliases", error) from None
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        aliases.setdefault(str(version), []).append(alias)
    return aliases


def version_rows(model_name: str) -> list[dict[str, str]]:
    """One row per version, newest first: aliases, status, test metrics and DVC experiment from its tags."""
    mlflow_client = client()
    aliases = aliases_by_version(mlflow_client, model_name)
    if aliases is None:
        raise PipelineError(f"no registered model {model_name!r} yet; run `dvc repro` to train and register one")
    with registry_calls("listing the versions"):
        versions = mlflow_client.search_model_versions(f"name='{model_name}'")
    rows = []
    for version in sorted(versions, key=lambda v: -int(v.version)):
        tags = version.tags or {}
        rows.append({
            "version": str(version.version),
            "aliases": ",".join(sorted(aliases.get(str(version.version), []))) or "-",
            "status": tags.get("validation_status", "-"),
            "test_accuracy": tags.get("test_accuracy", "-"),
            "test_macro_f1": tags.get("test_macro_f1", "-"),
            "preset": tags.get("preset", "-"),
            "dvc_exp": tags.get("dvc_exp_name", "-"),
            "run_id": (version.run_id or "-")[:12],
        })
    return rows


# ---- commands: python -m pipeline registry | promote | rollback -------------------------------------


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no versions)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def rescore_on_test(params):
    """A score(model_uri) -> accuracy function over the current test split, and its digest."""
    from pipeline.core.data import load_split, split_digest
    from pipeline.core.scoring import make_scorer

    test = load_split(params.paths.test_split)
    return make_scorer(test, params.evaluate.batch_size), split_digest(test)


def _command(prog: str, description: str, argv: list[str] | None, add_arguments=None):
    import argparse

    from pipeline.core.config import load_params
    from pipeline.core.runtime import setup_logging

    parser = argparse.ArgumentParser(prog=f"python -m pipeline {prog}", description=description)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return args, load_params()


@exit_on_user_error
def list_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline registry`: the versions, aliases, status and metrics."""
    _, params = _command("registry", "list registered versions, aliases and metrics", argv)
    print(format_table(version_rows(params.tracking.registered_model)))
    return 0


@exit_on_user_error
def promote_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline promote --version N`: the promotion rule by hand; exit 1 when rejected."""
    def arguments(parser):
        parser.add_argument("--version", required=True, help="model version number")
        parser.add_argument("--force", action="store_true", help="promote even if it does not beat the champion")

    args, params = _command("promote", "promote a registered version to champion", argv, arguments)
    name = params.tracking.registered_model
    score, digest = rescore_on_test(params)
    decision = promote(name, args.version, params.promote.margin, digest, score, force=args.force,
                       lock_url=params.promote.lock)
    print(f"{name} v{args.version}: {decision.status}: {decision.reason}")
    return 0 if decision.promote else 1


@exit_on_user_error
def rollback_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline rollback`: champion back to the version that held it before."""
    _, params = _command("rollback", "move champion back to the previous champion", argv)
    name = params.tracking.registered_model
    previous, restored = rollback_champion(client(), name, params.promote.lock)
    print(f"{name}: champion moved back from v{previous} to v{restored}")
    return 0
