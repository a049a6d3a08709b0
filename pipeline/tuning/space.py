"""The search space: Optuna suggestions as recipe overrides, checked before any trial runs."""

from __future__ import annotations

from pydantic import ValidationError

from pipeline.core.config import Choice, FloatRange, IntRange, Recipe
from pipeline.core.errors import PipelineError


def encode_choice(value):
    """Optuna choices must be scalars: lists (conv_filters) travel as '32-64' strings."""
    return "-".join(str(v) for v in value) if isinstance(value, list) else value


def decode_choice(value, original_choices: list):
    for choice in original_choices:
        if encode_choice(choice) == value:
            return choice
    return value


def suggest(trial, space: dict) -> dict:
    """Sample one value per search dimension; returns Recipe overrides (decoded)."""
    values = {}
    for name, dimension in space.items():
        if isinstance(dimension, Choice):
            picked = trial.suggest_categorical(name, [encode_choice(c) for c in dimension.choices])
            values[name] = decode_choice(picked, dimension.choices)
        elif isinstance(dimension, IntRange):
            values[name] = trial.suggest_int(name, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
        elif isinstance(dimension, FloatRange):
            values[name] = trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)
    return values


def validate_space(base: Recipe, space: dict) -> None:
    """Every choice and range end must make a valid recipe, checked before any trial runs."""
    for name, dimension in space.items():
        ends = dimension.choices if isinstance(dimension, Choice) else [dimension.low, dimension.high]
        for value in ends:
            try:
                base.with_overrides({name: value})
            except ValidationError as error:
                first = error.errors()[0]["msg"]
                raise PipelineError(f"bad parameter in params.yaml: tune.space.{name}: value {value!r}: {first}") from None


def baseline_params(base: Recipe, space: dict) -> dict:
    """The untuned preset expressed in the study's parameter names (to enqueue as trial 0)."""
    values = {}
    for name, dimension in space.items():
        value = getattr(base, name)
        if isinstance(dimension, Choice):
            if encode_choice(value) not in [encode_choice(c) for c in dimension.choices]:
                return {}  # the preset lies outside the space; no baseline trial
            value = encode_choice(value)
        elif not dimension.low <= value <= dimension.high:
            return {}
        values[name] = value
    return values


def best_overrides(study, space: dict) -> dict:
    """The best completed trial's values as recipe overrides (choices decoded)."""
    best = max((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    return {name: decode_choice(value, space[name].choices) if isinstance(space.get(name), Choice) else value
            for name, value in best.params.items() if name in space}
