"""The input features of a 28x28 picture, computed in one place for the prediction log, the
reference saved at registration, and the drift report.

Each is a plain number a person can read: how much ink, how bright, where the bounding box of the
ink lies, and how far its centre of mass sits from the picture's centre. A thicker pen moves
`ink_fraction` and `mean_intensity`; a picture drawn off-centre moves the box and the offsets.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.data import IMAGE_SIDE

INK_LEVEL = 64  # a pixel at or above this (0-255) counts as ink
FEATURES = ("ink_fraction", "mean_intensity", "bbox_top", "bbox_left", "bbox_height", "bbox_width",
            "com_dx", "com_dy")  # the column order of `input_features`


def as_pixels(pixels) -> np.ndarray:
    """Any (n, 28, 28[, 1]) array of 0-255 values as uint8 (n, 28, 28): what the log stores."""
    array = np.asarray(pixels).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def input_features(pixels) -> np.ndarray:
    """(n, len(FEATURES)) float32 features of n pictures of 0-255 pixels.

    A picture without ink has an empty box: top and left at the centre, height and width 0, and no
    offset."""
    images = as_pixels(pixels).astype(np.float32)
    n = len(images)
    ink = images >= INK_LEVEL
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (n, 28) each
    has_ink = rows.any(axis=1)
    side = np.arange(IMAGE_SIDE, dtype=np.float32)
    top = np.where(has_ink, rows.argmax(axis=1), IMAGE_SIDE // 2)
    bottom = np.where(has_ink, IMAGE_SIDE - 1 - rows[:, ::-1].argmax(axis=1), IMAGE_SIDE // 2 - 1)
    left = np.where(has_ink, cols.argmax(axis=1), IMAGE_SIDE // 2)
    right = np.where(has_ink, IMAGE_SIDE - 1 - cols[:, ::-1].argmax(axis=1), IMAGE_SIDE // 2 - 1)
    mass = images.sum(axis=(1, 2))
    safe_mass = np.where(mass > 0, mass, 1.0)
    centre = (IMAGE_SIDE - 1) / 2
    com_y = (images.sum(axis=2) @ side) / safe_mass - centre
    com_x = (images.sum(axis=1) @ side) / safe_mass - centre
    columns = (ink.reshape(n, -1).mean(axis=1), images.reshape(n, -1).mean(axis=1), top, left,
               bottom - top + 1, right - left + 1, np.where(mass > 0, com_x, 0.0), np.where(mass > 0, com_y, 0.0))
    return np.stack(columns, axis=1).astype(np.float32)
