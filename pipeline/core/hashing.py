"""File digests: the one sha256 of a file that fetch and the model hashes share, and the .npz writer
whose files have one digest per content."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def write_stable_npz(arrays: dict[str, np.ndarray], target: str | Path | BinaryIO) -> None:
    """An .npz that `np.load` reads, byte-for-byte the same for the same arrays: every member has a
    fixed date (np.savez stamps the current time), so its sha256 identifies its content."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
