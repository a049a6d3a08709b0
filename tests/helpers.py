"""Params for tests: the repository's params.yaml with some values changed, never code defaults
(params.yaml is the one source of every default)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pipeline.core.config import FetchParams, Params, PreprocessParams, Recipe, RuntimeParams, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, section by section (a None value removes the key)."""
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict) and key not in ("space",):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def params_with(changes: dict | None = None) -> Params:
    return parse_params(merged(raw_params(), changes or {}))


def make_recipe(preset: str = "reference", **overrides) -> Recipe:
    """A preset of params.yaml with some fields changed."""
    return Recipe.model_validate({**raw_params()["presets"][preset], **overrides})


def fetch_params(**overrides) -> FetchParams:
    return FetchParams.model_validate({**raw_params()["fetch"], **overrides})


def preprocess_params(**overrides) -> PreprocessParams:
    return PreprocessParams.model_validate({**raw_params()["preprocess"], **overrides})


def runtime_params(**overrides) -> RuntimeParams:
    return RuntimeParams.model_validate({**raw_params()["runtime"], **overrides})
