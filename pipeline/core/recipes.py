"""The recipe `train` uses: the configured preset, with the tune stage's best values on top when
`train.use_tuned` is set. Shared by `train` and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import Params, Recipe
from pipeline.core.errors import PipelineError


def read_best_params(path: Path) -> dict:
    """The tune stage's result: {"base_preset": ..., "params": {...}}; clear errors when damaged."""
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing; run `dvc repro tune` first, or set train.use_tuned=false"
        )
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or not isinstance(content.get("params"), dict):
            raise ValueError("expected an object with a 'params' object")
    except (ValueError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is damaged ({error}); re-create it with `dvc repro -f tune`") from None
    return content


def resolve_recipe(params: Params, best_params: dict | None) -> Recipe:
    """The preset, with the study's best values on top when `train.use_tuned` is set."""
    recipe = params.recipe()
    if not params.train.use_tuned or best_params is None:
        return recipe
    base = best_params.get("base_preset")
    if base != params.train.preset:
        raise PipelineError(
            f"best params were tuned for preset {base!r} but train.preset is {params.train.preset!r}; "
            f"set tune.base_preset={params.train.preset} or train.use_tuned=false"
        )
    try:
        return recipe.with_overrides(best_params["params"])
    except Exception as error:
        raise PipelineError(f"tuned params do not fit preset {base!r} ({error}); re-run `dvc repro -f tune`") from None
