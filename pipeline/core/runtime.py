"""Explicit process setup: logging, TF threads and seeds, done before TensorFlow starts."""

from __future__ import annotations

import logging
import os
import random

from pipeline.core.config import RuntimeParams
from pipeline.core.errors import RedactingFilter


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # URL passwords never reach a log line
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
    quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Optuna flags heartbeats and its matplotlib plots as experimental on every use; we chose them."""
    import warnings

    warnings.filterwarnings("ignore", message=".*experimental.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    quiet_tensorflow_logs()


def quiet_tensorflow_logs() -> None:
    """Hide TensorFlow's C++ log below FATAL; must run before TensorFlow is imported.

    With op determinism on, TF 2.21's tf.data `make_deterministic` rewrite turns Keras' parallel map
    into a plain MapDataset but keeps its `use_unbounded_threadpool` attribute, and the runtime logs
    an E0000 line for it once per input pipeline: harmless (the attribute is ignored), but it reads
    as a failure. Real op failures still arrive as Python exceptions. `TF_CPP_MIN_LOG_LEVEL=0`
    shows everything again."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# Lines TensorFlow's C++ side prints to stderr as it loads, whatever TF_CPP_MIN_LOG_LEVEL says (absl
# writes them before its log is initialised): each stage would start with them.
TENSORFLOW_LOAD_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                         "cpu_feature_guard.cc")


def import_tensorflow() -> None:
    """Import TensorFlow (once per process) with its load-time notices held back; every other line it
    writes to stderr while loading is passed on."""
    import sys
    import tempfile

    if "tensorflow" in sys.modules:
        return
    quiet_tensorflow_logs()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in TENSORFLOW_LOAD_NOISE):
                    sys.stderr.write(line)


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """True where the CPU computes bf16 in hardware (Intel AMX or AVX512-BF16), so bf16 is faster."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as stream:
                cpuinfo = stream.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def dtype_policy(runtime: RuntimeParams) -> str:
    if runtime.precision == "auto":
        return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    return runtime.precision


def setup_tensorflow(runtime: RuntimeParams, seed: int) -> None:
    """Set threads, determinism, the dtype policy and every seed (Python, NumPy, TF) from params.

    Thread counts must be set before TF runs its first op, so call this first thing in main().
    """
    import_tensorflow()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(runtime.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(runtime.inter_op_threads)
    except RuntimeError:  # TF already initialised in this process (tests, tuning loops)
        pass
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(dtype_policy(runtime))
