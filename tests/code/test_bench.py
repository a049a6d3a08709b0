"""The benchmarks: pure pieces on fakes, then both commands end to end at a tiny scale."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from bench.pruning import saving, summarize_arm, trial_record
from bench.report import carry_sprint_section, pruning_markdown, sprint_section, train_markdown, write_sprint_section
from bench.training import default_dtype_policy, first_reaching, inference_throughput, ratio, threshold_key
from pipeline.core.config import Recipe, load_params
from pipeline.core.data import Split, stratified_take
from tests.conftest import REPO_ROOT
from tests.serving.fixtures import mnist_file, tiny_model_path  # noqa: F401


# ---- pure pieces ----------------------------------------------------------------------------------

def test_first_reaching_reports_the_first_epoch_at_or_above_the_threshold():
    accuracies, seconds = [0.981, 0.990, 0.989, 0.996], [10.0, 20.0, 30.0, 40.0]
    assert first_reaching(accuracies, seconds, 0.99) == {"epochs": 2, "seconds": 20.0}
    assert first_reaching(accuracies, seconds, 0.995) == {"epochs": 4, "seconds": 40.0}
    assert first_reaching(accuracies, seconds, 0.999) == {"epochs": None, "seconds": None}
    assert [threshold_key(t) for t in (0.99, 0.995)] == ["99.0", "99.5"]


def test_ratio_is_none_when_either_side_is_missing():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None


def test_inference_throughput_warms_up_then_counts_images():
    calls = []
    result = inference_throughput(lambda batch: calls.append(batch.shape[0]), np.zeros((10, 28, 28, 1), np.float32),
                                  (1, 32), min_seconds=0.0, warmup_calls=2, min_calls=5)
    assert calls == [1] * 7 + [32] * 7  # 2 warm-up + 5 timed per size; 32 > 10 images repeats them
    assert set(result) == {"1", "32"} and all(r["calls"] == 5 and r["images_per_s"] > 0 for r in result.values())


def test_a_killed_benchmark_takes_its_training_process_with_it():
    import psutil

    bench = subprocess.Popen([sys.executable, "-c", "import time\nfrom bench.training import run_in_fresh_process\n"
                              "run_in_fresh_process(time.sleep, 120)"], cwd=REPO_ROOT)
    workers = []
    try:
        parent = psutil.Process(bench.pid)
        deadline = time.monotonic() + 60
        while not (workers := [p for p in parent.children() if "resource_tracker" not in " ".join(p.cmdline())]):
            assert time.monotonic() < deadline, "no worker process was spawned"
            time.sleep(0.2)
        bench.kill()  # SIGKILL: the parent cannot pass anything on
        bench.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"worker {alive} outlived the killed benchmark"
    finally:
        for process in [bench, *workers]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()


def test_sprint_medians_count_a_run_that_never_reached_the_target_as_slowest():
    from bench.sprint import median_seconds, summarize

    assert median_seconds([30.0, None, 10.0]) == 30.0
    assert median_seconds([None, None, 10.0]) is None
    row = lambda seconds: {"seconds_to_target": seconds}  # noqa: E731
    summary = summarize({"reference": [row(100.0), row(None), row(80.0)], "sprint": [row(20.0), row(30.0), row(None)]})
    assert summary["median_seconds_to_target"] == {"reference": 100.0, "sprint": 30.0}
    assert summary["seeds_reaching_target"] == {"reference": 2, "sprint": 2}
    assert summary["ratios_sprint_over_reference"] == {"time_to_99_0": 0.3}


def test_the_test_clock_stops_training_at_the_target():
    from bench.training import make_test_clock

    labels = np.arange(10) % 10

    class Perfect:  # predicts every label right: accuracy 1.0
        stop_training = False

        def predict(self, x, **kwargs):
            return np.eye(10)[labels]

    for stop_at, stops in ((0.99, True), (None, False)):
        clock, model = make_test_clock(np.zeros((10, 28, 28, 1)), labels, stop_at), Perfect()
        clock.set_model(model)
        clock.on_epoch_end(0)
        assert clock.test_accuracy == [1.0] and model.stop_training is stops


def fake_trial(number: int, state: str, values: list[float]):
    """A finished trial that reported one value per epoch trained."""
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState[state], value=values[-1] if state == "COMPLETE" else None,
        params={"dropout": 0.1}, distributions={"dropout": optuna.distributions.FloatDistribution(0.0, 0.5)},
        intermediate_values=dict(enumerate(values)))
    trial.number = number
    return trial


def test_workers_arm_keeps_its_best_params_out_of_the_project(tmp_path):
    from bench.workers import arm_params
    from pipeline.core.config import parse_params

    raw = arm_params(REPO_ROOT / "params.yaml", "postgresql+psycopg://h/db", "bench-x", trials=4, workers=2,
                     work_dir=tmp_path)
    params = parse_params(raw)
    tune = params.tune
    assert Path(params.paths.best_params).parent == tmp_path  # not models/best_params.json, which train reads
    assert Path(params.paths.tune_summary).parent == tmp_path  # nor the project's metrics/tune.json
    assert (tune.storage, tune.study_name, tune.n_trials, tune.workers) == ("postgresql+psycopg://h/db", "bench-x", 4, 2)


def test_pruned_trials_count_only_the_epochs_they_ran():
    trials = [trial_record(fake_trial(0, "COMPLETE", [0.9, 0.95, 0.97])), trial_record(fake_trial(1, "PRUNED", [0.5])),
              trial_record(fake_trial(2, "COMPLETE", [0.92, 0.96, 0.98]))]
    assert [t["epochs"] for t in trials] == [3, 1, 3]
    pruned = summarize_arm("median", trials, wall_seconds=7.0, max_epochs=3)
    assert (pruned["trial_epochs"], pruned["pruned"], pruned["complete"], pruned["best_trial"]) == (7, 1, 2, 2)
    unpruned = summarize_arm("none", [trial_record(fake_trial(n, "COMPLETE", [0.9, 0.95, 0.97])) for n in range(3)],
                             wall_seconds=10.0, max_epochs=3)
    assert saving(pruned, unpruned) == {"trial_epochs_ratio": 0.778, "trial_epochs_saved_fraction": 0.222,
                                        "wall_seconds_ratio": 0.7, "best_val_accuracy_difference": 0.01}


# ---- end to end, tiny ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_params(mnist_npz, tmp_path_factory) -> Path:
    """The repo's params.yaml (its presets as they are now) over a few hundred prepared images."""
    work = tmp_path_factory.mktemp("bench")
    prepared = work / "prepared"
    prepared.mkdir()
    with np.load(mnist_npz) as raw:
        train, test = Split(raw["x_train"], raw["y_train"]), Split(raw["x_test"], raw["y_test"])
    for name, split, size in (("train", train, 400), ("val", train, 200), ("test", test, 200)):
        part = stratified_take(split, size, seed=len(name))
        np.savez(prepared / f"{name}.npz", x=part.x, y=part.y)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["paths"].update({f"{name}_split": str(prepared / f"{name}.npz") for name in ("train", "val", "test")})
    params["paths"]["best_params"] = str(work / "no_best_params.json")  # the default preset runs untuned
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_bench(*args: str, out: Path, env: dict | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out)], cwd=REPO_ROOT,
                            env={**clean, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_benchmark_tiny(tiny_params, tmp_path):
    run_bench("train", "--params", str(tiny_params), "--epochs-reference", "1", "--epochs-default", "2",
              "--inference-seconds", "0.05", out=tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("python -m bench train")
    assert {"cpu_model", "usable_cores", "tensorflow", "keras", "date"} <= set(record["machine"])
    models = record["models"]
    assert set(models) == {"reference", "default"}
    assert (models["reference"]["epochs"], models["default"]["epochs"]) == (1, 2)
    presets = yaml.safe_load(tiny_params.read_text())["presets"]
    assert models["reference"]["recipe"] == Recipe.model_validate(presets["reference"]).model_dump()
    for model in models.values():
        epochs = model["epochs"]
        assert model["train_images"] == 400 and model["test_images"] == 200
        assert len(model["test_accuracy_by_epoch"]) == len(model["train_seconds_by_epoch"]) == epochs
        assert model["train_seconds_by_epoch"] == sorted(model["train_seconds_by_epoch"])
        assert model["train_seconds"] == pytest.approx(model["train_seconds_by_epoch"][-1], abs=1e-3)
        assert model["final_test_accuracy"] == pytest.approx(model["test_accuracy_by_epoch"][-1], abs=1e-5)
        assert 0.0 <= model["final_test_accuracy"] <= model["best_test_accuracy"] <= 1.0
        for reached in model["to_accuracy"].values():
            assert reached["epochs"] is None or 1 <= reached["epochs"] <= epochs
            assert (reached["epochs"] is None) == (reached["seconds"] is None)
        memory = model["memory"]
        assert 0 < memory["rss_after_setup_mib"] <= memory["peak_rss_training_mib"]
        assert set(model["inference"]) == {"1", "32", "1000"}
        assert all(row["images_per_s"] > 0 for row in model["inference"].values())
        assert set(model["inference_served"]) == {"1", "32", "1000"}
        assert all(row["images_per_s"] > 0 for row in model["inference_served"].values())
        assert model["inference_predict_batch_1"]["images_per_s"] > 0
    assert models["reference"]["dtype_policy"] == "float32"  # whatever the params say
    assert models["default"]["dtype_policy"] == default_dtype_policy(load_params(tiny_params))
    ratios = record["ratios_default_over_reference"]
    assert ratios["train_seconds"] == ratio(models["default"]["train_seconds"], models["reference"]["train_seconds"])
    assert set(ratios["inference_images_per_s"]) == {"1", "32", "1000"}
    assert ratios["served_batch_1_over_reference_predict"] == ratio(
        models["default"]["inference_served"]["1"]["images_per_s"], models["reference"]["inference_predict_batch_1"]["images_per_s"])
    markdown = (tmp_path / "results.md").read_text()
    assert markdown == train_markdown(record) + "\n" and "| Epochs to 99.0 % test accuracy |" in markdown


@pytest.mark.slow
def test_sprint_benchmark_tiny(tiny_params, tmp_path):
    from bench.report import sprint_markdown

    run_bench("sprint", "--params", str(tiny_params), "--seeds", "1", "--epochs-sprint", "1", "--epochs-reference", "2",
              out=tmp_path)
    record = json.loads((tmp_path / "sprint.json").read_text())
    presets = yaml.safe_load(tiny_params.read_text())["presets"]
    assert record["recipes"] == {name: Recipe.model_validate(presets[name]).model_dump() for name in ("reference", "sprint")}
    assert record["settings"]["seeds"] == [yaml.safe_load(tiny_params.read_text())["seed"]]
    assert record["settings"]["max_epochs"] == {"reference": 2, "sprint": 1}
    for role, epochs in (("reference", 2), ("sprint", 1)):
        (run,) = record["runs"][role]
        assert run["epochs_trained"] == epochs == len(run["test_accuracy_by_epoch"])  # 400 images never reach 99 %
        assert run["seconds_to_target"] is None and run["epochs_to_target"] is None
    assert record["median_seconds_to_target"] == {"reference": None, "sprint": None}
    assert record["ratios_sprint_over_reference"] == {"time_to_99_0": None}
    assert (tmp_path / "sprint.md").read_text() == sprint_markdown(record) + "\n" and "not reached" in sprint_markdown(record)
    results = json.loads((tmp_path / "results.json").read_text())  # the ratio, beside the train benchmark's
    assert results == {"sprint": sprint_section(record)} and results["sprint"]["time_to_99_0"] is None


def test_results_json_keeps_the_latest_sprint_summary_across_train_benchmarks(tmp_path):
    sprint = {"command": "python -m bench sprint", "machine": {"date": "2026-12-02T10:00:00+00:00"},
              "settings": {"seeds": [42, 43]}, "median_seconds_to_target": {"reference": 250.0, "sprint": 40.0},
              "seeds_reaching_target": {"reference": 2, "sprint": 2},
              "ratios_sprint_over_reference": {"time_to_99_0": 0.16}}
    (tmp_path / "results.json").write_text(json.dumps({"benchmark": "train", "models": {}}))
    write_sprint_section(tmp_path, sprint)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["benchmark"] == "train" and results["sprint"]["time_to_99_0"] == 0.16
    assert results["sprint"]["median_seconds_to_99_0"] == {"reference": 250.0, "sprint": 40.0}
    new_train = {"benchmark": "train", "models": {"reference": {}}}
    assert carry_sprint_section(tmp_path, "results", new_train) == {**new_train, "sprint": results["sprint"]}
    assert carry_sprint_section(tmp_path, "pruning", new_train) == new_train
    assert carry_sprint_section(tmp_path / "empty", "results", new_train) == new_train


@pytest.mark.slow
def test_accuracy_benchmark_tiny(tiny_params, tmp_path):
    from bench.report import accuracy_markdown

    run_bench("accuracy", "--params", str(tiny_params), "--seeds", "2", "--epochs", "2", "--patience", "1",
              out=tmp_path)
    record = json.loads((tmp_path / "accuracy.json").read_text())
    params = yaml.safe_load(tiny_params.read_text())
    assert record["settings"]["preset"] == "accurate" and record["settings"]["seeds"] == [params["seed"], params["seed"] + 1]
    assert record["settings"]["recipe"] == Recipe.model_validate(params["presets"]["accurate"]).model_dump()
    seeds = record["seeds"]
    assert [row["seed"] for row in seeds] == record["settings"]["seeds"]
    for row in seeds:
        assert 1 <= row["best_epoch"] <= row["epochs_run"] <= 2 and row["train_seconds"] > 0
        assert row["test_images"] == 200 and row["test_errors"] == round((1 - row["test_accuracy"]) * 200)
        assert 0.0 <= row["handwriting_accuracy"] <= 1.0
    assert record["mean_test_accuracy"] == pytest.approx(sum(row["test_accuracy"] for row in seeds) / 2)
    ensemble = record["ensemble"]
    assert ensemble["members"] == 2 and ensemble["seeds"] == record["settings"]["seeds"]
    assert ensemble["parameters"] == sum(row["parameters"] for row in seeds)  # both members, nothing else
    assert 0.0 <= ensemble["test_accuracy"] <= 1.0 and 0.0 <= ensemble["handwriting_accuracy"] <= 1.0
    markdown = (tmp_path / "accuracy.md").read_text()
    assert markdown == accuracy_markdown(record) + "\n" and "| ensemble of the 2 |" in markdown


@pytest.mark.slow
def test_pruning_benchmark_tiny(tiny_params, tmp_path):
    run_bench("pruning", "--params", str(tiny_params), "--trials", "2", "--epochs", "2", "--train-images", "200",
              "--val-images", "100", out=tmp_path)
    record = json.loads((tmp_path / "pruning.json").read_text())
    assert record["settings"] | {"n_trials": 2, "epochs": 2, "train_images": 200, "val_images": 100} == record["settings"]
    pruned, unpruned = record["arms"]["pruned"], record["arms"]["unpruned"]
    assert pruned["pruner"] == yaml.safe_load(tiny_params.read_text())["tune"]["pruner"] and unpruned["pruner"] == "none"
    assert unpruned["pruned"] == 0 and unpruned["trial_epochs"] == unpruned["trial_epochs_without_pruning"] == 4
    assert pruned["trial_epochs"] <= unpruned["trial_epochs"]
    for arm in (pruned, unpruned):
        assert arm["trials"] == arm["complete"] + arm["pruned"] == len(arm["per_trial"]) == 2
        assert arm["trial_epochs"] == sum(t["epochs"] for t in arm["per_trial"])
        assert all(1 <= t["epochs"] <= 2 for t in arm["per_trial"])
        assert all(t["epochs"] == 2 for t in arm["per_trial"] if t["state"] == "COMPLETE")
        assert 0.0 <= arm["best_val_accuracy"] <= 1.0 and arm["wall_seconds"] > 0
    assert pruned["per_trial"][0]["params"] == unpruned["per_trial"][0]["params"]  # same seed, same first trial
    assert record["saving"] == saving(pruned, unpruned)
    assert (tmp_path / "pruning.md").read_text() == pruning_markdown(record) + "\n"


@pytest.mark.slow
def test_serve_benchmark_of_a_registered_champion(tiny_params, tiny_model_path, mnist_file, tmp_path, monkeypatch):
    """A small model registered as champion in a scratch store, served by both servers and measured for real."""
    import mlflow

    from bench.serving import serve_markdown
    from tests.serving.fixtures import register_model

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    register_model(tiny_model_path, "mnist-cnn", mnist_file, tmp_path / "artifacts")
    mlflow.MlflowClient().set_registered_model_alias("mnist-cnn", "champion", "1")
    run_bench("serve", "--params", str(tiny_params), "--requests", "20", "--seconds", "1", out=tmp_path, env={"MLFLOW_TRACKING_URI": store})
    record = json.loads((tmp_path / "serve.json").read_text())
    assert record["model"] == {"uri": "models:/mnist-cnn/1", "name": "mnist-cnn", "version": "1"}
    from bench.serving import ratio

    assert set(record["servers"]) == {"project", "mlflow", "project_no_verdict", "project_no_log", "floor"}
    for kind, server in record["servers"].items():
        for key in ("latency", "latency_new_connection"):  # keep-alive, and a new connection per request
            latency = server[key]
            assert latency["requests"] == 20 and 0 < latency["min_ms"] <= latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
            if kind == "floor":  # no model: a fixed answer
                assert "predicted_digit" not in latency
            else:
                assert latency["predicted_digit"] == record["servers"]["project"]["latency"]["predicted_digit"]
        assert server["peak_rss_mib"] > 0
        if kind in ("project_no_verdict", "project_no_log", "floor"):  # latency rounds only
            assert not any(key.startswith("throughput") for key in server)
            continue
        for clients in (1, 8):
            throughput = server[f"throughput_{clients}_clients"]
            assert throughput["answered"] > 0 and throughput["lost"] == 0, (kind, throughput)
    assert record["verdict_cost_p50_ms"] == round(record["servers"]["project"]["latency"]["p50_ms"]
                                                  - record["servers"]["project_no_verdict"]["latency"]["p50_ms"], 3)
    assert record["log_cost_p50_ms"] == round(record["servers"]["project"]["latency"]["p50_ms"]
                                              - record["servers"]["project_no_log"]["latency"]["p50_ms"], 3)
    servers = record["servers"]
    assert record["ratios"]["project_over_floor_latency_p50"] == ratio(servers["project"]["latency"]["p50_ms"],
                                                                       servers["floor"]["latency"]["p50_ms"])
    assert record["ratios"]["project_over_floor_new_connection_latency_p50"] == ratio(
        servers["project"]["latency_new_connection"]["p50_ms"], servers["floor"]["latency_new_connection"]["p50_ms"])
    # a new connection per request costs its connect and close: the floor is slower than on keep-alive
    assert servers["floor"]["latency_new_connection"]["min_ms"] > servers["floor"]["latency"]["min_ms"]
    assert (tmp_path / "serve.md").read_text() == serve_markdown(record) + "\n"


def test_bench_servers_log_to_a_scratch_store_never_the_projects():
    from bench.serving import server_command

    logged = server_command("project", "models:/m/1", 1, "sqlite:////tmp/scratch/predictions.db")
    assert logged[logged.index("--log-storage") + 1] == "sqlite:////tmp/scratch/predictions.db"
    assert "--no-log" in server_command("project_no_log", "models:/m/1", 1, "sqlite:////tmp/x.db")
