from pipeline.core.tracking import RUN_KIND_TAG, provenance_tags, run_tags


def test_run_tags_carry_the_dvc_experiment_only_inside_one(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    plain = run_tags("train", "abc123")
    assert plain[RUN_KIND_TAG] == "train" and plain["params_hash"] == "abc123"
    assert "dvc_exp_name" not in plain and "dvc_exp_baseline_rev" not in plain

    monkeypatch.setenv("DVC_EXP_NAME", "wider-net")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    tagged = run_tags("train", "abc123")
    assert tagged["dvc_exp_name"] == "wider-net" and tagged["dvc_exp_baseline_rev"] == "f" * 40


def test_provenance_tags_rename_the_commit_and_skip_what_is_absent():
    tags = {"mlflow.source.git.commit": "c0ffee", "params_hash": "abc123", "dvc_exp_name": "wider-net",
            "dvc_exp_baseline_rev": "", RUN_KIND_TAG: "train", "mlflow.user": "someone"}
    assert provenance_tags(tags) == {"git_commit": "c0ffee", "params_hash": "abc123", "dvc_exp_name": "wider-net"}
    assert provenance_tags({}) == {}
