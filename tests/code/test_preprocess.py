import numpy as np
import pytest

from pipeline.core.data import Split, check_images, load_split, save_split, stratified_take
from pipeline.core.errors import PipelineError
from pipeline.preprocess import count_shared_images, prepare_splits
from tests.helpers import preprocess_params


def fake_raw(n_train=2000, n_test=500, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def test_split_is_stratified_seeded_and_disjoint():
    raw = fake_raw()
    splits = prepare_splits(raw, preprocess_params(val_size=500), seed=1)
    assert len(splits["train"]) == 1500 and len(splits["val"]) == 500 and len(splits["test"]) == 500
    assert np.bincount(splits["val"].y).tolist() == [50] * 10
    assert count_shared_images(splits["train"].x, splits["val"].x) == 0
    again = prepare_splits(raw, preprocess_params(val_size=500), seed=1)
    np.testing.assert_array_equal(again["val"].x, splits["val"].x)
    other = prepare_splits(raw, preprocess_params(val_size=500), seed=2)
    assert not np.array_equal(other["val"].x, splits["val"].x)


def test_limits_shrink_train_and_test_stratified():
    splits = prepare_splits(fake_raw(), preprocess_params(val_size=500, train_limit=300, test_limit=100), seed=0)
    assert len(splits["train"]) == 300 and len(splits["test"]) == 100
    assert np.bincount(splits["train"].y).tolist() == [30] * 10


def test_duplicates_between_test_and_train_fail():
    raw = fake_raw()
    raw["x_test"][7] = raw["x_train"][123]
    with pytest.raises(ValueError, match="1 test images also appear in the training split"):
        prepare_splits(raw, preprocess_params(val_size=500), seed=0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(y_train=r["y_train"] + 1), "labels span 1..10"),
        (lambda r: r.update(x_train=r["x_train"].astype(np.float32)), "float32, expected uint8"),
        (lambda r: r.update(x_test=r["x_test"][:, :27]), r"shape \(500, 27, 28\)"),
        (lambda r: r.update(y_train=np.zeros(2000, dtype=np.uint8)), "class balance is off"),
        (lambda r: r.pop("y_test"), "lacks arrays"),
    ],
)
def test_checks_name_the_problem(mutate, message):
    raw = fake_raw()
    mutate(raw)
    with pytest.raises(ValueError, match=message):
        prepare_splits(raw, preprocess_params(val_size=500), seed=0)


def test_val_size_too_large_names_the_param_fix_not_a_refetch():
    with pytest.raises(PipelineError, match="leaves no training images") as refused:
        prepare_splits(fake_raw(), preprocess_params(val_size=5000), seed=0)
    assert "set preprocess.val_size below" in str(refused.value) and "fetch" not in str(refused.value)


def test_save_and_load_roundtrip_and_damage(tmp_path):
    splits = prepare_splits(fake_raw(), preprocess_params(val_size=500), seed=0)
    (tmp_path / "prepared").mkdir()
    save_split(splits["val"], tmp_path / "prepared" / "val.npz")
    loaded = load_split(tmp_path / "prepared" / "val.npz")
    np.testing.assert_array_equal(loaded.x, splits["val"].x)
    (tmp_path / "prepared" / "val.npz").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="val.npz is damaged.*dvc repro -f preprocess"):
        load_split(tmp_path / "prepared" / "val.npz")
    with pytest.raises(PipelineError, match="missing; run `dvc repro preprocess`"):
        load_split(tmp_path / "prepared" / "absent.npz")


def test_stratified_take_keeps_all_when_size_is_zero():
    split = Split(np.zeros((20, 28, 28), np.uint8), (np.arange(20) % 10).astype(np.uint8))
    assert stratified_take(split, 0, 0) is split
    check_images(split.x, split.y, "tiny")
