import pytest
import yaml

from pipeline.core.config import load_params, params_hash, parse_params
from pipeline.core.errors import PipelineError
from tests.helpers import merged, raw_params, make_recipe


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
        ({"train": {"preset": "nope"}}, "train.preset='nope' is not a preset"),
        ({"train": {"patience": None}}, "train.patience: Field required"),
        ({"presets": {"fast": {"warmup": None}}}, "onecycle needs warmup"),
        ({"presets": {"accurate": {"weight_decay": 0.0}}}, "adamw needs weight_decay"),
        ({"presets": {"fast": {"optimizer": "sgd"}}}, "presets.fast.optimizer"),
        ({"tune": {"heartbeat_interval_s": 10, "grace_period_s": 15}}, "must be at least twice heartbeat_interval_s"),
        ({"tune": {"workers": 2}}, "tune.workers=2 needs a shared database server, not SQLite"),
        ({"presets": {"fast": {"dropout": 1.5}}, "train": {"preset": "fast"}, "tune": {"base_preset": "fast"}},
         "presets.fast.dropout"),
        ({"fetch": {"sources": ["ftp"]}}, "fetch.sources.0"),
    ],
)
def test_bad_params_name_the_key(raw, named):
    with pytest.raises(PipelineError) as error:
        parse_params(merged(raw_params(), raw))
    assert named in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("raw", "starts"),
    [
        # the misspelling explains the missing key beside it: it is named first
        ({"train": {"epochs": None, "epoch": 30}}, "train.epoch: unknown key"),
        ({"train": {"preset": "nope"}}, "train.preset='nope' is not a preset; choose one of"),
        ({"train": {"epochs": "ten"}}, "train.epochs: Input should be a valid integer"),
    ],
)
def test_error_names_the_unknown_key_or_bad_value_first(raw, starts):
    with pytest.raises(PipelineError) as error:
        parse_params(merged(raw_params(), raw))
    message = str(error.value).removeprefix("bad parameter in params.yaml: ")
    assert message.startswith(starts) and "<top level>" not in message and "Value error" not in message


def test_error_shows_the_bad_value():
    with pytest.raises(PipelineError, match=r"train\.epochs: .* \(got 'ten'\)"):
        parse_params(merged(raw_params(), {"train": {"epochs": "ten"}}))


def test_search_space_rejects_unknown_keys_and_bad_ranges():
    with pytest.raises(PipelineError, match="unknown search-space key"):
        parse_params(merged(raw_params(), {"tune": {"space": {"learnin_rate": {"low": 0.1, "high": 0.2}}}}))
    with pytest.raises(PipelineError, match="must be below high"):
        parse_params(merged(raw_params(), {"tune": {"space": {"dropout": {"low": 0.5, "high": 0.1}}}}))
    with pytest.raises(PipelineError, match="log range needs low > 0"):
        parse_params(merged(raw_params(), {"tune": {"space": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}}}))


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
    recipe = make_recipe()
    assert recipe.with_overrides({"dropout": 0.2}).dropout == 0.2
    with pytest.raises(ValueError):
        recipe.with_overrides({"dropout": 2.0})


def test_params_hash_is_stable_and_sensitive(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    first, again = parse_params(raw), parse_params(raw)
    assert params_hash(first) == params_hash(again)
    raw["seed"] += 1
    assert params_hash(parse_params(raw)) != params_hash(first)


def test_a_stage_view_hides_unlisted_sections_and_every_preset_but_its_own(repo_root):
    """`Params.only`: what dvc.yaml does not list for a stage fails when read, and a narrowed entry
    (`presets.${train.preset}`) leaves just that preset, so the stage's params hash ignores the others."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"]["preset"] = "fast"
    sections = ("seed", "train", "presets.${train.preset}")
    view = parse_params(raw).only("train", sections)
    assert view.recipe() == parse_params(raw).presets["fast"]
    with pytest.raises(PipelineError, match=r"reads preset 'reference', but dvc.yaml lists only `presets.\$\{train.preset\}`"):
        view.recipe("reference")
    with pytest.raises(PipelineError, match="reads params section 'evaluate'"):
        view.evaluate.batch_size
    raw["presets"]["another"] = raw["presets"]["reference"]  # a new preset, and another one changed
    raw["presets"]["reference"]["dropout"] = 0.11
    assert params_hash(parse_params(raw).only("train", sections)) == params_hash(view)
    raw["presets"]["fast"]["dropout"] = 0.11  # the stage's own preset changed
    assert params_hash(parse_params(raw).only("train", sections)) != params_hash(view)


def test_params_yaml_is_the_only_source_of_defaults():
    """No pipeline knob has a code default: a missing section or key is an error naming it."""
    from pipeline.core.config import Params, Recipe

    for name, section in Params.model_fields.items():
        assert section.is_required(), f"{name} has a code default"
        for key, field in getattr(section.annotation, "model_fields", {}).items():
            assert field.is_required(), f"{name}.{key} has a code default"
    off_by_default = {name for name, field in Recipe.model_fields.items() if not field.is_required()}
    assert off_by_default == {"weight_decay", "warmup", "ema_epochs"}  # each means "not used" when left out
    assert {Recipe.model_fields[name].default for name in off_by_default} == {0.0, None}


def test_every_preset_knob_is_used_by_some_preset_or_the_search_space():
    params = parse_params(raw_params())
    from pipeline.core.config import Recipe

    values = {name: {str(getattr(recipe, name)) for recipe in params.presets.values()} for name in Recipe.model_fields}
    for name, seen in values.items():
        assert len(seen) > 1 or name in params.tune.space, f"presets.*.{name} never varies: make it a constant"


@pytest.mark.parametrize("override, removed, added", [
    ("train.epochs=20", ["  epochs: 30"], ["  epochs: 20"]),
    ("fetch.sources=[pypi]", ["  - local", "  - keras"], []),
])
def test_set_param_rewrites_only_the_value_it_sets(repo_root, tmp_path, override, removed, added):
    """`dvc exp run -S key=value` (DVC's own `apply_overrides`) leaves every other line of params.yaml
    as written: its lists are in the block style DVC writes back, comments where they were."""
    import difflib

    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text())
    apply_overrides(str(params), [override])
    diff = list(difflib.unified_diff((repo_root / "params.yaml").read_text().splitlines(),
                                     params.read_text().splitlines(), lineterm="", n=0))[2:]
    assert [line[1:] for line in diff if line.startswith("-")] == removed
    assert [line[1:].split("  #")[0].rstrip() for line in diff if line.startswith("+")] == added
