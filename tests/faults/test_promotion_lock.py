"""Promotions exclude each other across machines: a PostgreSQL advisory lock (`promote.lock`), a refusal
when a shared registry has no shared lock, and a second decision when the champion changed anyway."""

from __future__ import annotations

import multiprocessing
import os
import random
import uuid

import pytest

from pipeline.registry import locks
from pipeline.registry import store as registry
from pipeline.core.errors import PipelineError
from tests.faults.test_registry_faults import DIGEST, MODEL, never_rescore, state, store  # noqa: F401 (fixture)


class RogueClient:
    """A real MlflowClient beside which a promoter that ignores the lock moves `champion` to `rogue_version`
    right after each of our champion writes (the first `times` of them)."""

    def __init__(self, real, rogue_version: str, times: int):
        self.real, self.rogue_version, self.times = real, rogue_version, times

    def __getattr__(self, name):
        return getattr(self.real, name)

    def set_registered_model_alias(self, name, alias, version):
        self.real.set_registered_model_alias(name, alias, version)
        if alias == registry.CHAMPION and self.times:
            self.times -= 1
            self.real.set_registered_model_alias(name, alias, self.rogue_version)


def add_version(real, accuracy: float) -> str:
    version = real.create_model_version(MODEL, source="models", tags={"test_accuracy": f"{accuracy:.6f}",
                                                                      "test_data_sha256": DIGEST})
    return str(version.version)


def test_a_champion_changed_during_promotion_is_decided_again(store, monkeypatch):
    worse = add_version(store, 0.96)  # v3: better than v1 (0.95), worse than v2 (0.97)
    monkeypatch.setattr(registry, "client", lambda: RogueClient(store, worse, times=1))
    decision = registry.promote(MODEL, "2", 0.0, DIGEST, never_rescore)
    assert decision.promote and "0.9600" in decision.reason  # decided again, against the rogue's champion
    assert state(store) == ({"champion": "2", "challenger": "2"}, f"1,2,{worse},2")  # every champion listed


def test_a_champion_that_keeps_changing_stops_with_one_line(store, monkeypatch):
    worse = add_version(store, 0.96)
    monkeypatch.setattr(registry, "client", lambda: RogueClient(store, worse, times=99))
    with pytest.raises(PipelineError, match="kept changing.*same promote.lock"):
        registry.promote(MODEL, "2", 0.0, DIGEST, never_rescore)


@pytest.mark.parametrize("uri", ["http://tracking-host:5000", "postgresql+psycopg://mlflow:pw@db-host/mlflow"])
def test_a_shared_registry_without_a_shared_lock_is_refused(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with pytest.raises(PipelineError, match="set promote.lock in params.yaml") as refused:
        with locks.promotion_lock(MODEL):
            raise AssertionError("promoted without a shared lock")
    assert "pw@" not in str(refused.value) and not (tmp_path / "mlruns").exists()
    locks.require_promotion_lock("postgresql://postgres@db-host/mlflow")  # with a lock: accepted


def test_the_embedded_store_keeps_its_file_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with locks.promotion_lock(MODEL):
        assert (tmp_path / "mlruns" / f".{MODEL}.promotion.lock").exists()


def test_an_unreachable_lock_is_one_line_without_its_password():
    with pytest.raises(PipelineError, match="promotion lock .*unreachable") as failed:
        with locks.promotion_lock(MODEL, "postgresql://postgres:s3cr3t@127.0.0.1:9/mlflow", timeout_s=5):
            raise AssertionError("no lock was taken")
    assert "s3cr3t" not in str(failed.value) and "postgres:***@127.0.0.1:9" in str(failed.value)
    assert "\n" not in str(failed.value)


@pytest.mark.postgres
def test_the_advisory_lock_excludes_a_second_holder(postgres_database):
    lock_url = postgres_database()
    with locks.promotion_lock(MODEL, lock_url):
        with pytest.raises(PipelineError, match="another promotion of mnist-cnn held the lock"):
            with locks.promotion_lock(MODEL, lock_url, timeout_s=1):
                raise AssertionError("two holders at once")
        with locks.promotion_lock("another-model", lock_url, timeout_s=1):
            pass  # one lock per model
    with locks.promotion_lock(MODEL, lock_url, timeout_s=1):
        pass  # released


# ---- the cross-machine race: two checkouts, one MLflow server on PostgreSQL -----------------------------

ROUNDS = 20


def _promoter(checkout: str, tracking_uri: str, jobs, results, barrier) -> None:
    """One machine's promoter: in its own checkout (own mlruns/, own params.yaml naming the shared
    lock), it promotes the version it is handed, at the same moment as the other promoter."""
    os.chdir(checkout)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    from pipeline.core.config import load_params

    params = load_params()
    while (version := jobs.get()) is not None:
        barrier.wait(timeout=60)
        try:
            decision = registry.promote(MODEL, version, params.promote.margin, DIGEST, never_rescore,
                                        lock_url=params.promote.lock)
            results.put((version, decision.status))
        except Exception as error:  # reported to the test, which fails on it
            results.put((version, f"error: {error}"))


@pytest.mark.slow
@pytest.mark.postgres
def test_cross_machine_promotion_race(tmp_path, postgres_database, mlflow_server):
    """20 rounds; each, two promoters in separate checkouts promote two new versions at once, both
    better than the champion. The better one must end as champion every time (last writer wins would
    get about half the rounds wrong), and the history must list every version that was champion."""
    import mlflow
    import yaml

    from tests.conftest import copy_project

    backend = postgres_database()
    tracking_uri = mlflow_server(backend)
    lock_url = backend.replace("+psycopg", "")  # any database every machine reaches; here the server's own
    checkouts = []
    for machine in ("a", "b"):
        checkout = copy_project(tmp_path / f"machine-{machine}")
        params = yaml.safe_load((checkout / "params.yaml").read_text())
        params["promote"]["lock"] = lock_url
        (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        checkouts.append(checkout)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(MODEL)
    run_id = client.create_run(client.create_experiment(f"race-{uuid.uuid4().hex[:6]}")).info.run_id
    margin = yaml.safe_load((checkouts[0] / "params.yaml").read_text())["promote"]["margin"]

    def new_version(accuracy: float) -> str:
        return str(client.create_model_version(MODEL, source=f"runs:/{run_id}/model", run_id=run_id, tags={
            "test_accuracy": f"{accuracy:.6f}", "test_data_sha256": DIGEST}).version)

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    queues = [context.Queue() for _ in checkouts]
    results = context.Queue()
    promoters = [context.Process(target=_promoter, args=(str(c), tracking_uri, q, results, barrier))
                 for c, q in zip(checkouts, queues)]
    for promoter in promoters:
        promoter.start()
    try:
        chooser, accuracy, champions = random.Random(13), 0.5, []
        for round_number in range(ROUNDS):
            good, best = new_version(accuracy + 4 * margin), new_version(accuracy + 8 * margin)
            accuracy += 8 * margin
            pair = [good, best] if chooser.random() < 0.5 else [best, good]  # either machine may hold the best
            for queue, version in zip(queues, pair):
                queue.put(version)
            outcome = dict(results.get(timeout=120) for _ in pair)
            assert not any(status.startswith("error") for status in outcome.values()), outcome
            assert outcome[best] == "promoted", (round_number, outcome)
            champions += [good, best] if outcome[good] == "promoted" else [best]
            model = client.get_registered_model(MODEL)
            assert str(model.aliases[registry.CHAMPION]) == best, (round_number, outcome)
            assert model.tags[registry.CHAMPION_HISTORY_TAG].split(",") == champions, round_number
    finally:
        for queue in queues:
            queue.put(None)
        for promoter in promoters:
            promoter.join(timeout=60)
            if promoter.is_alive():
                promoter.kill()
    assert [p.exitcode for p in promoters] == [0, 0]
    assert not any((c / "mlruns" / f".{MODEL}.promotion.lock").exists() for c in checkouts)  # no file lock used
