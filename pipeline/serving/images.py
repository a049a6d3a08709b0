"""Users' pictures to model input: decode safely, then turn a photo or scan into MNIST pixels.

`prepare_image` turns an arbitrary picture into what MNIST was made of: white ink on black,
the ink's box scaled to fit 20x20 keeping its aspect ratio, then placed in 28x28 so that its
centre of mass sits at the centre. Models take those raw 0-255 pixels unscaled.
"""

from __future__ import annotations

import functools

import logging
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from pipeline.core.data import IMAGE_SIDE
from pipeline.core.errors import PipelineError, first_line

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
MAX_PIXELS = 40_000_000  # larger pictures are refused before decoding (decompression bombs)
WORKING_SIDE = 800  # pictures are shrunk to at most this many pixels a side before any filtering
BOX = 20  # MNIST: the ink's bounding box is scaled to fit 20x20, then centred by mass in 28x28
MIN_STROKE_PX = 2.0  # pen width in the 20x20 box below which strokes are thickened (MNIST: ~2-3)
CORE_PERCENTILE = 75.0  # ink at or above this percentile of the digit's pixels is full white
EDGE_FRACTION = 0.3  # ink below this fraction of the ink/paper threshold is black
MIN_CONTRAST = 24.0  # grey levels between paper and ink below which the picture holds no digit


class ImageError(PipelineError):
    """A file or upload that cannot be read as an image, or that holds no digit."""


# --- reading -------------------------------------------------------------------------------


def webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """The canvas of an extended (VP8X) WebP, read from its first 30 bytes: libwebp allocates it
    while Pillow opens the file, before any size check could run."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:16] != b"WEBPVP8X":
        return None
    return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")


def check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{label}: image is {width}x{height}; use one of at most {MAX_PIXELS // 1_000_000} megapixels")


def peek(source: str | Path | IO[bytes], size: int) -> bytes:
    if hasattr(source, "read"):
        position = source.tell()
        head = source.read(size)
        source.seek(position)
        return head
    with open(source, "rb") as stream:
        return stream.read(size)


@functools.cache
def limit_pillow_decoding() -> None:
    """Pillow's process-wide bomb guard, set once: it refuses (DecompressionBombError) pictures over
    twice MAX_IMAGE_PIXELS as it opens them, which is MAX_PIXELS."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


def read_image(source: str | Path | IO[bytes], name: str | None = None) -> Image.Image:
    """Open and decode a picture (a path or a binary file object); ImageError if it is not one."""
    label = name or str(source)
    limit_pillow_decoding()
    try:
        canvas = webp_canvas_size(peek(source, 30))
        if canvas:
            check_size(*canvas, label)
        with Image.open(source, formats=ACCEPTED_FORMATS) as image:
            check_size(*image.size, label)
            if image.format == "JPEG":
                image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # decode big photos at reduced scale
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.copy()
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{label}: not a readable image; use a PNG, JPEG or BMP (also GIF, TIFF, WebP)"
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: image is over {MAX_PIXELS // 1_000_000} megapixels; use a smaller one") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageError(f"{label}: cannot decode image ({first_line(error)})") from None


# --- preparing -----------------------------------------------------------------------------


def to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels 0-255 (float32); transparent parts become white paper."""
    if image.mode in ("P", "PA") or (image.mode not in ("RGBA", "LA") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit scans: stretch to 8 bits
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ImageError("the image holds NaN or infinite pixel values; save it as an 8-bit PNG or JPEG")
        low, high = float(values.min()), float(values.max())
        return ((values - low) * (255.0 / max(high - low, 1e-6))).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32)


def shrink(grey: np.ndarray, max_side: int = WORKING_SIDE) -> np.ndarray:
    """Anti-aliased downscale so that filtering costs the same for a scan and a 24-MP photo."""
    height, width = grey.shape
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(grey, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)


def border(values: np.ndarray) -> np.ndarray:
    """The outer ring of pixels (about 4% of each side, at least one pixel)."""
    height, width = values.shape
    dy, dx = max(1, height // 25), max(1, width // 25)
    return np.concatenate(
        [values[:dy].ravel(), values[-dy:].ravel(), values[:, :dx].ravel(), values[:, -dx:].ravel()]
    )


def ink_is_dark(grey: np.ndarray) -> bool:
    """Dark ink on light paper? Paper is what the border shows; ink is the other extreme."""
    low, high = np.percentile(grey, [1.0, 99.0])
    return bool(np.median(border(grey)) >= (low + high) / 2.0)


def otsu_threshold(values: np.ndarray) -> float:
    """The level that best splits values into two classes (Otsu, on a 256-bin histogram)."""
    counts, edges = np.histogram(values, bins=256, range=(0.0, max(float(values.max()), 1e-6)))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def ink_layer(grey: np.ndarray) -> np.ndarray:
    """Ink strength >= 0 with the paper at 0, flattening uneven lighting and grain."""
    bright = 255.0 - grey if ink_is_dark(grey) else grey.copy()
    height, width = bright.shape
    if min(height, width) >= 64:
        bright = ndimage.median_filter(bright, size=3)  # sensor grain and paper speckle
    # Paper level under uneven lighting: an opening wider than any stroke erases the ink.
    # Computed on a subsampled copy so that a big picture costs little.
    window = max(9, min(height, width) // 4)
    step = max(1, window // 8)
    coarse = bright[::step, ::step]
    paper = ndimage.grey_opening(coarse, size=(max(3, window // step),) * 2)
    paper = ndimage.uniform_filter(paper, size=max(3, window // step))
    if step > 1:
        paper = ndimage.zoom(paper, (height / paper.shape[0], width / paper.shape[1]), order=1)
        paper = np.pad(paper, [(0, max(0, height - paper.shape[0])), (0, max(0, width - paper.shape[1]))], mode="edge")
        paper = paper[:height, :width]
    return np.clip(bright - paper, 0.0, None)


def digit_mask(ink: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels of the digit: above threshold, in blobs big enough not to be specks or dirt."""
    mask = ink > threshold
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    strength = ndimage.sum_labels(ink, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(strength >= 0.08 * strength.max()) + 1
    return np.isin(labels, keep)


def stroke_width(mask: np.ndarray) -> float:
    """Mean pen width in pixels: a strip of width w has mean distance-to-edge about (w + 2) / 4."""
    distances = ndimage.distance_transform_edt(mask)
    inside = distances[mask]
    return float(max(4.0 * inside.mean() - 2.0, 1.0)) if inside.size else 0.0


def disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius + radius


def normalised_ink(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ink levels 0-255 with the stroke core saturated and everything off the digit at 0."""
    if float(ink.max()) < MIN_CONTRAST:
        raise ImageError("no digit found: the picture has no contrast between ink and paper")
    threshold = otsu_threshold(ink)
    mask = digit_mask(ink, threshold)
    core = float(np.percentile(ink[mask], CORE_PERCENTILE))
    low = EDGE_FRACTION * threshold
    levels = np.clip((ink - low) / max(core - low, 1e-6), 0.0, 1.0)
    near_digit = ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=2)
    return np.where(near_digit, levels, 0.0).astype(np.float32) * 255.0, mask


def crop_to_ink(levels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of all ink, faint anti-aliased edges included."""
    ink = levels > 0
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise ImageError("no digit found: the picture seems blank")
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return levels[box], mask[box]


def thicken(levels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Widen a fine pen so that it keeps about MNIST's stroke width once shrunk into 20x20."""
    side = max(levels.shape)
    width_in_box = stroke_width(mask) * BOX / side
    radius = round((MIN_STROKE_PX - width_in_box) / 2.0 * side / BOX)
    if radius < 1:
        return levels
    return ndimage.grey_dilation(np.pad(levels, radius), footprint=disk(radius))


def fit_box(levels: np.ndarray, box: int = BOX) -> np.ndarray:
    """Pad to a square (keeping the aspect ratio) and resample anti-aliased to box x box."""
    height, width = levels.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = levels
    resized = np.asarray(Image.fromarray(square, mode="F").resize((box, box), Image.Resampling.LANCZOS))
    return np.where(resized < 4.0, 0.0, np.minimum(resized, 255.0)).astype(np.float32)  # drop ringing


def centre_by_mass(digit: np.ndarray, side: int = IMAGE_SIDE) -> np.ndarray:
    """Place a box in side x side so that its centre of mass is at the centre, ink kept inside."""
    canvas = np.zeros((side, side), dtype=np.float32)
    height, width = digit.shape
    if not digit.any():
        raise ImageError("no digit found: the ink vanished when scaled down")
    cy, cx = ndimage.center_of_mass(digit)
    # MNIST's centres of mass average (14.0, 14.0) in pixel-index coordinates.
    top = int(np.clip(round(side / 2.0 - cy), 0, side - height))
    left = int(np.clip(round(side / 2.0 - cx), 0, side - width))
    canvas[top : top + height, left : left + width] = digit
    return canvas


def prepare_image(image: Image.Image) -> np.ndarray:
    """A picture of one digit as MNIST pixels: 28x28 float32 in 0-255, white ink on black.

    Raises ImageError when the picture shows no ink (blank or flat).
    """
    grey = shrink(to_grey(image))
    levels, mask = normalised_ink(ink_layer(grey))
    levels, mask = crop_to_ink(levels, mask)
    levels = thicken(levels, mask)
    return centre_by_mass(fit_box(levels))
