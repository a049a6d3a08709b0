"""What a benchmark ran on, and the process's memory high-water mark."""

from __future__ import annotations

import os
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

MIB = 1024 * 1024


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The `model name` line of /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(versions: dict[str, str] | None = None) -> dict:
    """CPU, cores, load, Python and library versions, and the date (UTC)."""
    from pipeline.core.tracking import git_commit

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_1m_at_start": load_average_1m(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        **(versions or {}),
    }


def framework_versions() -> dict[str, str]:
    """TensorFlow and Keras versions (imports TensorFlow)."""
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark since it started (getrusage; KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / MIB, 1)
