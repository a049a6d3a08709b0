"""The model registry's state: versions of `mnist-cnn`, the `challenger`/`champion` aliases with
their history, and the promotion step that moves them (with undo when a write fails).

Aliases, never the deprecated stages. Everything is read and decided before the first write; a store
error at any call stops with one line (`store_failure`), never with a guess.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.tracking import configure_tracking, registry_uri, store_unreachable
from pipeline.core.verdict import ACCEPTANCE_TAG, REJECTION_TAG
from pipeline.registry.decision import Decision, decide_promotion
from pipeline.registry.locks import promotion_lock

log = logging.getLogger("pipeline.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_MODEL_NAME = "mnist-cnn"  # what serving assumes outside a project (params.yaml names it inside)
CHAMPION_HISTORY_TAG = "champion_history"  # on the model: versions that held champion, oldest first


def champion_uri_of(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def champion_uri(params_file: str = "params.yaml") -> str:
    """The champion of the project's registered model (`tracking.registered_model` in params.yaml;
    the model's usual name where no params.yaml is at hand, e.g. serving from another folder)."""
    from pipeline.core.config import load_params
    from pipeline.core.paths import resolve_in_project

    path = resolve_in_project(params_file)
    name = load_params(path).tracking.registered_model if path.is_file() else DEFAULT_MODEL_NAME
    return champion_uri_of(name)


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
        raise store_unreachable(uri, error.strerror or type(error).__name__) from None


def client():
    from mlflow import MlflowClient

    uri = configure_tracking()
    check_database_server(registry_uri())
    try:
        return MlflowClient()
    except Exception as error:  # an unreachable database fails here, as sqlalchemy's error
        raise store_unreachable(uri, f"{type(error).__name__}: {first_line(error)}") from None


def is_not_found(error: Exception) -> bool:
    """MLflow's answer for a model or alias that does not exist (and only that)."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


def store_failure(action: str, error: Exception) -> PipelineError:
    """One line for a registry that did not answer as it should: nothing is decided on a guess."""
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


def find_version_for_run(mlflow_client, run_id: str, model_name: str | None = None):
    """The newest version registered from this run (of `model_name`, if given); None if there is none."""
    query = f"run_id='{run_id}'" + (f" and name='{model_name}'" if model_name else "")
    with registry_calls("looking for the run's version"):
        versions = mlflow_client.search_model_versions(query)
    return max(versions, key=lambda v: int(v.version), default=None)


def register(model_uri: str, model_name: str, run_id: str, tags: dict[str, str]):
    """Register the run's model as a new version (or reuse the run's version), tagging its metrics."""
    import mlflow

    mlflow_client = client()
    version = find_version_for_run(mlflow_client, run_id, model_name)
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


def accuracy_on_test_data(mlflow_client, model_name: str, champion, test_digest: str, score) -> float:
    """A version's test accuracy on the current test data (the candidate's or the champion's): its tag if measured on the same
    data, else re-scored with `score(model_uri)`."""
    return figure_on_data(mlflow_client, model_name, champion, ("test_accuracy", "test_data_sha256"), test_digest, score)


def figure_on_data(mlflow_client, model_name: str, version, tags: tuple[str, str], digest: str, score) -> float:
    """A version's figure (`tags`: its tag and the tag of the data digest it was measured on) on the data
    `digest` names: the tag if measured there, else re-scored with `score(model_uri)` and tagged."""
    figure_tag, digest_tag = tags
    known = version.tags or {}
    if known.get(digest_tag) == digest and figure_tag in known:
        return float(known[figure_tag])
    log.info("%s: data changed since v%s was scored; re-scoring it", figure_tag, version.version)
    figure = float(score(f"models:/{model_name}/{version.version}"))
    with registry_calls(f"recording the re-scored {figure_tag}"):
        mlflow_client.set_model_version_tag(model_name, version.version, figure_tag, f"{figure:.6f}")
        mlflow_client.set_model_version_tag(model_name, version.version, digest_tag, digest)
    return figure


FEEDBACK_TAGS = ("feedback_accuracy", "feedback_data_sha256")  # a version's figure on users' feedback holdout


@dataclass(frozen=True)
class FeedbackHoldout:
    """Users' feedback holdout, as the promotion rule compares on it (`decision.decide_promotion`)."""

    digest: str  # identifies the holdout's pictures and labels
    images: int
    score: Callable[[str], float]  # score(model_uri) -> accuracy of a registered version on it
    margin: float  # promote.feedback_margin
    min_images: int  # promote.min_feedback_images: a smaller holdout decides nothing

    def figures(self, mlflow_client, model_name: str, candidate, champion) -> tuple[float, float] | None:
        if champion is None or self.images < self.min_images:
            return None
        return tuple(figure_on_data(mlflow_client, model_name, version, FEEDBACK_TAGS, self.digest, self.score)
                     for version in (candidate, champion))


MAX_DECISIONS = 3  # a champion that changes under us this often means a promoter outside the lock


def promote(model_name: str, version: str, margin: float, test_digest: str, score, force: bool = False,
            lock_url: str = "", min_digit_acceptance: float = 0.0, feedback: FeedbackHoldout | None = None) -> Decision:
    """Make `version` the challenger, then champion if it beats the champion by `margin` (or `force`),
    unless its digit verdict accepts fewer test digits than `min_digit_acceptance`; within the margin,
    `feedback` (users' holdout, when there is one) decides.

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
        candidate_accuracy = accuracy_on_test_data(mlflow_client, model_name, candidate, test_digest, score)
        champion = alias_version(mlflow_client, model_name, CHAMPION)
        for _ in range(MAX_DECISIONS):
            decision = decide_and_write(mlflow_client, model_name, candidate, candidate_accuracy, champion,
                                        margin, test_digest, score, force, min_digit_acceptance, feedback)
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


def verdict_figures(version, role: str) -> dict[str, str]:
    """The digit verdict's figures of a version, as decision tags `compared_<role>_<figure>`."""
    tags = {} if version is None else version.tags or {}
    return {f"compared_{role}_{tag}": tags.get(tag, "none") for tag in (ACCEPTANCE_TAG, REJECTION_TAG)}


def decide_and_write(mlflow_client, model_name: str, candidate, candidate_accuracy: float, champion, margin: float,
                     test_digest: str, score, force: bool, min_digit_acceptance: float = 0.0,
                     feedback: FeedbackHoldout | None = None) -> Decision:
    """Decide `candidate` against `champion` (None: there is none), record the decision, write the aliases."""
    version = str(candidate.version)
    on_feedback = None
    if champion is not None and str(champion.version) == version:
        decision = Decision(True, "already champion", candidate_accuracy, candidate_accuracy, margin)
    else:
        rival = None if champion is None else accuracy_on_test_data(mlflow_client, model_name, champion, test_digest, score)
        acceptance = (candidate.tags or {}).get(ACCEPTANCE_TAG)
        on_feedback = None if feedback is None else feedback.figures(mlflow_client, model_name, candidate, champion)
        decision = decide_promotion(candidate_accuracy, rival, margin, None if acceptance is None else float(acceptance),
                                    min_digit_acceptance, on_feedback, 0.0 if feedback is None else feedback.margin)
        if force and not decision.promote:
            decision = Decision(True, f"promoted by hand over: {decision.reason}", candidate_accuracy, rival, margin)
    extra = {"compared_champion_version": "none" if champion is None else str(champion.version),
             **verdict_figures(candidate, "candidate"), **verdict_figures(champion, "champion")}
    if champion is not None and str(champion.version) != version and on_feedback is not None:
        extra.update(compared_candidate_feedback_accuracy=f"{on_feedback[0]:.6f}",
                     compared_champion_feedback_accuracy=f"{on_feedback[1]:.6f}")
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
            "digits_accepted": tags.get(ACCEPTANCE_TAG, "-"),
            "nondigits_rejected": tags.get(REJECTION_TAG, "-"),
            "preset": tags.get("preset", "-"),
            "dvc_exp": tags.get("dvc_exp_name", "-"),
            "run_id": (version.run_id or "-")[:12],
        })
    return rows


def rescore_on_test(params):
    """A score(model_uri) -> accuracy function over the current test split, and its digest."""
    from pipeline.core.data import load_split, split_digest
    from pipeline.core.scoring import make_scorer

    test = load_split(params.paths.test_split)
    return make_scorer(test, params.evaluate.batch_size), split_digest(test)
