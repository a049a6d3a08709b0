import json

import optuna
import pytest

from pipeline.core.errors import PipelineError
from pipeline.tuning.space import baseline_params, decode_choice, encode_choice, suggest, validate_space
from pipeline.tuning.study import make_sampler
from tests.helpers import params_with, make_recipe


def space_of(raw_space):
    return params_with({"train": {"preset": "reference"}, "tune": {"base_preset": "reference", "space": raw_space}}).tune.space


def test_suggest_decodes_list_choices_and_ranges():
    space = space_of({"conv_filters": {"choices": [[16, 32], [32, 64]]}, "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                      "dense_units": {"low": 32, "high": 256, "step": 32}})
    trial = optuna.trial.FixedTrial({"conv_filters": "32-64", "learning_rate": 0.001, "dense_units": 96})
    values = suggest(trial, space)
    assert values == {"conv_filters": [32, 64], "learning_rate": 0.001, "dense_units": 96}
    assert make_recipe().with_overrides(values).conv_filters == [32, 64]


def test_choice_encoding_roundtrip():
    choices = [[16, 32], [32, 64, 128], "adam"]
    for choice in choices:
        assert decode_choice(encode_choice(choice), choices) == choice


def test_validate_space_rejects_values_a_recipe_refuses():
    with pytest.raises(PipelineError, match=r"tune.space.dropout: value 1.0"):
        validate_space(make_recipe(), space_of({"dropout": {"low": 0.1, "high": 1.0}}))
    with pytest.raises(PipelineError, match="tune.space.optimizer: value 'rmsprop'"):
        validate_space(make_recipe(), space_of({"optimizer": {"choices": ["adam", "rmsprop"]}}))
    with pytest.raises(PipelineError, match="adamw needs weight_decay"):  # the reference preset sets none
        validate_space(make_recipe(), space_of({"optimizer": {"choices": ["adam", "adamw"]}}))
    validate_space(make_recipe("fast"), space_of({"optimizer": {"choices": ["adam", "adamw"]}}))


def test_baseline_is_the_preset_when_inside_the_space():
    space = space_of({"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "batch_size": {"choices": [64, 128]}})
    assert baseline_params(make_recipe(), space) == {"learning_rate": 0.001, "batch_size": 128}
    outside = space_of({"batch_size": {"choices": [64, 256]}})
    assert baseline_params(make_recipe(), outside) == {}


def test_resumed_sampler_does_not_replay_startup_trials():
    def first_values(sampler):
        study = optuna.create_study(sampler=sampler)
        return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]

    assert first_values(make_sampler(42, 0)) == first_values(make_sampler(42, 0))
    assert first_values(make_sampler(42, 0)) != first_values(make_sampler(42, 3))


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruning_never_throws_away_a_trial_that_trained_all_its_epochs():
    from pipeline.tuning.objective import pruning_callback

    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    early, full = study.ask(), study.ask()
    with pytest.raises(optuna.TrialPruned):
        pruning_callback(early, "val_accuracy", epochs=3).on_epoch_end(0, {"val_accuracy": 0.5})
    callback = pruning_callback(full, "val_accuracy", epochs=3)
    callback.on_epoch_end(2, {"val_accuracy": 0.9})  # the last epoch: reported, not pruned
    assert study.get_trials()[full.number].intermediate_values == {2: 0.9}


def test_more_trials_without_a_better_one_leave_the_best_params_file_unchanged(tmp_path):
    """`train` depends on best_params.json: trial counts go to the summary only, so a study that grows
    without finding a better trial does not make `dvc repro` retrain."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from pipeline.tune import write_results

    params = params_with({"train": {"preset": "reference"}, "tune": {
        "base_preset": "reference", "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                              "conv_filters": {"choices": [[16, 32], [32, 64]]}}},
        "paths": {"best_params": str(tmp_path / "best_params.json"), "tune_summary": str(tmp_path / "tune.json")}})
    distributions = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
                     "conv_filters": CategoricalDistribution(["16-32", "32-64"])}
    study = optuna.create_study(study_name="s", direction="maximize")

    def add(state, value=None, rate=0.001, filters="32-64"):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, distributions=distributions,
                                                  params={"learning_rate": rate, "conv_filters": filters}))

    add(optuna.trial.TrialState.COMPLETE, 0.95)
    summary = write_results(study, params)
    best_params = (tmp_path / "best_params.json").read_text()
    assert json.loads(best_params) == {"study_name": "s", "base_preset": "reference", "best_trial": 0,
                                       "params": {"learning_rate": 0.001, "conv_filters": [32, 64]}}
    assert json.loads((tmp_path / "tune.json").read_text()) == {
        "study_name": "s", "best_value": 0.95, "best_trial": 0, "baseline_value": None, "trials": {"COMPLETE": 1}}

    add(optuna.trial.TrialState.COMPLETE, 0.90, rate=0.005, filters="16-32")
    add(optuna.trial.TrialState.PRUNED, rate=0.009)
    summary = write_results(study, params)
    assert (tmp_path / "best_params.json").read_text() == best_params
    assert summary["trials"] == {"COMPLETE": 2, "PRUNED": 1} and summary["best_value"] == 0.95

    add(optuna.trial.TrialState.COMPLETE, 0.97, rate=0.002, filters="16-32")
    write_results(study, params)
    assert json.loads((tmp_path / "best_params.json").read_text())["params"] == {"learning_rate": 0.002,
                                                                                  "conv_filters": [16, 32]}
