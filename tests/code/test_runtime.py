from tests.helpers import runtime_params
from pipeline.core.paths import project_root
from pipeline.core.runtime import cpu_has_native_bfloat16, dtype_policy


def test_bfloat16_is_detected_from_cpu_flags():
    assert cpu_has_native_bfloat16("flags : fpu sse avx512f amx_bf16 amx_tile")
    assert cpu_has_native_bfloat16("flags : fpu avx512_bf16")
    assert not cpu_has_native_bfloat16("flags : fpu sse avx2 avx512f")


def test_explicit_precision_wins_over_auto():
    assert dtype_policy(runtime_params(precision="float32")) == "float32"
    assert dtype_policy(runtime_params(precision="mixed_bfloat16")) == "mixed_bfloat16"
    assert dtype_policy(runtime_params(precision="auto")) in ("float32", "mixed_bfloat16")


def test_temp_experiment_folders_resolve_to_the_outer_repository(tmp_path):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert project_root(inner) == tmp_path / "repo"
    assert project_root(tmp_path / "repo") == tmp_path / "repo"


def test_tensorflow_loads_without_its_load_time_notices(repo_root):
    """TensorFlow's C++ side prints the absl and oneDNN notices whatever TF_CPP_MIN_LOG_LEVEL says;
    a stage's log starts with its own lines instead."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pipeline.core.runtime import import_tensorflow; import_tensorflow(); "
            "print('loaded', 'tensorflow' in sys.modules); print('after', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")} | {"PYTHONPATH": str(repo_root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "loaded True", result.stderr[-2000:]
    assert result.stderr.strip() == "after", result.stderr  # nothing before it; stderr works again after the import
