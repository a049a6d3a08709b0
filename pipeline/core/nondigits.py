"""A generated set of pictures that are not digits, in MNIST style, for measuring a digit verdict.

Offline and deterministic: `generate(kind, count, seed, split)` draws `count` 28x28 uint8 pictures
(white ink on black, content scaled into a 20x20 box and centred by its centre of mass, as MNIST
digits are; noise pictures fill the frame). Kinds (`KINDS`):

- `letters_symbols`: letters and symbols whose shapes no digit shares, rendered from fonts with a
  random size, rotation, shear and stroke width. Pillow's own FreeType font (`load_default(size)`)
  always works; system DejaVu/Liberation fonts are used when present.
- `doodles`: stars, spirals, scribbles, crosses, grids, crossed circles, waves, ...
- `noise_blank`: Gaussian, uniform and salt-and-pepper noise, blank, full ink, a single pixel, ...
- `clothing`: filled, grey-shaded silhouettes of shirts, trousers, shoes, bags, dresses
  (Fashion-MNIST-like).

`split` is `calibration` (for fitting a verdict) or `heldout` (for reporting on pictures never
seen in calibration): the two use other seeds AND other characters, fonts, shape families and
parameters, so heldout figures measure generalisation rather than memory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pipeline.core.data import IMAGE_SIDE

KINDS = ("letters_symbols", "doodles", "noise_blank", "clothing")
SPLITS = ("calibration", "heldout")
SIDE, BOX, WORK = IMAGE_SIDE, 20, 112  # MNIST frame, MNIST's digit box, drawing canvas

# Letters and symbols that no digit shares (no O o l I i S s Z z B b g q D G J L); the splits do not
# share a character.
CHARACTERS = {
    "calibration": "ACEFHKMPRUWYaehmrwx#%+=&",
    "heldout": "NTVXcfknuvy@*?<>",
}
FONT_FILES = {
    "calibration": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf",
                    "DejaVuSansMono.ttf"],
    "heldout": ["DejaVuSerif.ttf", "LiberationSerif-Italic.ttf", "LiberationSansNarrow-Bold.ttf",
                "DejaVuSans-Oblique.ttf", "LiberationMono-Regular.ttf"],
}
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))

DOODLES = {
    "calibration": ("star", "spiral", "scribble", "cross", "grid", "hash"),
    "heldout": ("crossed_circle", "wave", "zigzag", "heart", "triangle", "flower", "arrow"),
}
NOISES = {
    "calibration": ("gaussian", "uniform", "blank", "full", "pixel", "salt_pepper"),
    "heldout": ("gaussian_blur", "stripes", "checker", "grey", "dots", "pixels", "salt_pepper_dense"),
}
CLOTHES = {
    "calibration": ("tshirt", "trouser", "sneaker", "bag", "dress"),
    "heldout": ("coat", "sandal", "ankle_boot", "pullover", "handbag", "skirt"),
}
SEED_STREAM = {"letters_symbols": 11, "doodles": 12, "noise_blank": 13, "clothing": 14}
SPLIT_STREAM = {"calibration": 1, "heldout": 2}


def mnist_frame(ink: np.ndarray, box: int = BOX, side: int = SIDE) -> np.ndarray:
    """Ink (float, any size, 0 = background) as MNIST pixels: the ink's bounding box padded to a
    square, resampled to box x box and placed in side x side with its centre of mass at the centre."""
    rows, cols = np.nonzero(ink > 8)
    if rows.size == 0:
        return np.zeros((side, side), dtype=np.uint8)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
    height, width = crop.shape
    square = np.zeros((max(height, width),) * 2, dtype=np.float32)
    top, left = (square.shape[0] - height) // 2, (square.shape[1] - width) // 2
    square[top : top + height, left : left + width] = crop
    small = np.asarray(Image.fromarray(square, mode="F").resize((box, box), Image.Resampling.LANCZOS))
    small = np.clip(np.where(small < 4.0, 0.0, small), 0.0, 255.0)
    canvas = np.zeros((side, side), dtype=np.float32)
    if small.any():
        cy, cx = ndimage.center_of_mass(small)
        top = int(np.clip(round(side / 2.0 - cy), 0, side - box))
        left = int(np.clip(round(side / 2.0 - cx), 0, side - box))
        canvas[top : top + box, left : left + box] = small
    return np.round(canvas).astype(np.uint8)


def rng_for(kind: str, seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), SEED_STREAM[kind], SPLIT_STREAM[split]])


@lru_cache(maxsize=None)
def font_paths(split: str) -> tuple[str, ...]:
    """The system fonts of a split that this machine has (may be none)."""
    found = []
    for name in FONT_FILES[split]:
        for folder in FONT_DIRS:
            hits = sorted(folder.rglob(name)) if folder.is_dir() else []
            if hits:
                found.append(str(hits[0]))
                break
    return tuple(found)


@lru_cache(maxsize=256)
def load_font(path: str, size: int):
    return ImageFont.load_default(size=size) if path == "default" else ImageFont.truetype(path, size)


def pen(rng: np.random.Generator, low: float = 5.0, high: float = 12.0) -> int:
    return int(rng.uniform(low, high))


def letter(rng: np.random.Generator, split: str) -> np.ndarray:
    text = str(rng.choice(list(CHARACTERS[split])))
    fonts = ("default",) + font_paths(split)
    path = str(fonts[rng.integers(len(fonts))])
    # Pillow's own font stands for a font no system has: the heldout split draws it thinner/larger.
    size = int(rng.uniform(56, 72)) if split == "calibration" else int(rng.uniform(60, 80))
    font = load_font(path, size)
    stroke = int(rng.integers(0, 4 if split == "calibration" else 3))
    image = Image.new("L", (WORK * 2, WORK * 2), 0)
    ImageDraw.Draw(image).text((WORK, WORK), text, fill=255, font=font, anchor="mm",
                               stroke_width=stroke, stroke_fill=255)
    shear = rng.uniform(-0.25, 0.25)
    image = image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * WORK, 0, 1, 0),
                            resample=Image.Resampling.BILINEAR)
    angle = rng.uniform(-20, 20) if split == "calibration" else rng.uniform(-30, 30)
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def polyline(draw: ImageDraw.ImageDraw, points: np.ndarray, width: int) -> None:
    pts = [tuple(map(float, p)) for p in points]
    draw.line(pts, fill=255, width=width, joint="curve")
    radius = width / 2.0
    for x, y in (pts[0], pts[-1]):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)


def doodle(rng: np.random.Generator, split: str) -> np.ndarray:
    family = str(rng.choice(DOODLES[split]))
    image = Image.new("L", (WORK, WORK), 0)
    draw = ImageDraw.Draw(image)
    width = pen(rng)
    c, r = WORK / 2.0, WORK * rng.uniform(0.36, 0.44)
    jitter = lambda n: rng.normal(0, 2.0, size=(n, 2))  # noqa: E731 - a hand's wobble
    if family == "star":
        points = int(rng.integers(5, 8))
        angles = np.linspace(0, 2 * np.pi, 2 * points + 1) + rng.uniform(0, np.pi)
        radii = np.where(np.arange(2 * points + 1) % 2 == 0, r, r * rng.uniform(0.35, 0.5))
        pts = np.c_[c + radii * np.cos(angles), c + radii * np.sin(angles)] + jitter(2 * points + 1)
        polyline(draw, pts, width)
    elif family == "spiral":
        turns = rng.uniform(2.0, 3.5)
        t = np.linspace(0, turns * 2 * np.pi, 200)
        rad = r * t / t[-1]
        t = t + rng.uniform(0, 2 * np.pi)
        pts = np.c_[c + rad * np.cos(t), c + rad * np.sin(t) * rng.choice([-1.0, 1.0])]
        polyline(draw, pts, max(4, width - 3))
    elif family == "scribble":
        n = int(rng.integers(8, 16))
        pts = rng.uniform(WORK * 0.1, WORK * 0.9, size=(n, 2))
        polyline(draw, pts, width)
    elif family == "cross":  # an X mark, sometimes with a plus over it
        polyline(draw, np.array([[c - r, c - r], [c + r, c + r]]) + jitter(2), width)
        polyline(draw, np.array([[c + r, c - r], [c - r, c + r]]) + jitter(2), width)
        if rng.random() < 0.4:
            polyline(draw, np.array([[c, c - r], [c, c + r]]), width)
            polyline(draw, np.array([[c - r, c], [c + r, c]]), width)
    elif family in ("grid", "hash"):
        lines = int(rng.integers(3, 6)) if family == "grid" else 2
        for pos in np.linspace(c - r, c + r, lines) if family == "grid" else (c - r / 3, c + r / 3):
            polyline(draw, np.array([[pos, c - r], [pos + rng.normal(0, 3), c + r]]), width)
            polyline(draw, np.array([[c - r, pos], [c + r, pos + rng.normal(0, 3)]]), width)
    elif family == "crossed_circle":
        draw.ellipse((c - r, c - r, c + r, c + r), outline=255, width=width)
        for _ in range(int(rng.integers(1, 4))):
            a = rng.uniform(0, np.pi)
            polyline(draw, np.array([[c - r * np.cos(a), c - r * np.sin(a)], [c + r * np.cos(a), c + r * np.sin(a)]]), width)
    elif family == "wave":
        x = np.linspace(c - r, c + r, 120)
        rows = int(rng.integers(1, 4))
        for k in range(rows):
            y = c + (k - (rows - 1) / 2) * r * 0.7 + r * 0.25 * np.sin(x / WORK * rng.uniform(14, 28))
            polyline(draw, np.c_[x, y], width)
    elif family == "zigzag":
        n = int(rng.integers(5, 9))
        x = np.linspace(c - r, c + r, n)
        y = c + np.where(np.arange(n) % 2 == 0, -r, r) * rng.uniform(0.3, 0.6)
        polyline(draw, np.c_[x, y] + jitter(n), width)
    elif family == "heart":
        t = np.linspace(0, 2 * np.pi, 120)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        polyline(draw, np.c_[c + x * r / 17, c + y * r / 17], width)
    elif family == "triangle":
        a = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3, 2 * np.pi])
        polyline(draw, np.c_[c + r * np.cos(a), c + r * np.sin(a)] + jitter(4), width)
    elif family == "flower":
        petals = int(rng.integers(4, 8))
        t = np.linspace(0, 2 * np.pi, 240)
        rad = r * (0.55 + 0.45 * np.abs(np.cos(petals * t / 2)))
        polyline(draw, np.c_[c + rad * np.cos(t), c + rad * np.sin(t)], max(4, width - 2))
        draw.ellipse((c - r / 5, c - r / 5, c + r / 5, c + r / 5), fill=255)
    else:  # arrow
        a = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(a), np.sin(a)])
        n = np.array([-d[1], d[0]])
        tip, tail = c + r * d, c - r * d
        polyline(draw, np.array([tail, tip]), width)
        polyline(draw, np.array([tip - 0.5 * r * d + 0.4 * r * n, tip, tip - 0.5 * r * d - 0.4 * r * n]), width)
    return np.asarray(image, dtype=np.float32)


def noise(rng: np.random.Generator, split: str) -> np.ndarray:
    """A full-frame picture (not centred: noise has no content to centre)."""
    family = str(rng.choice(NOISES[split]))
    shape = (SIDE, SIDE)
    if family == "gaussian":
        out = rng.normal(rng.uniform(60, 140), rng.uniform(30, 80), shape)
    elif family == "uniform":
        out = rng.uniform(0, rng.uniform(128, 256), shape)
    elif family == "blank":
        out = np.zeros(shape)
    elif family == "full":
        out = np.full(shape, rng.uniform(200, 255))
    elif family == "pixel":
        out = np.zeros(shape)
        out[rng.integers(4, 24), rng.integers(4, 24)] = 255
    elif family == "salt_pepper":
        out = np.where(rng.random(shape) < rng.uniform(0.05, 0.3), 255.0, 0.0)
    elif family == "gaussian_blur":
        out = ndimage.gaussian_filter(rng.normal(0, 1, shape), rng.uniform(1.0, 2.5))
        out = 128 + out / (out.std() + 1e-9) * 70
    elif family == "stripes":
        period = rng.uniform(3, 8)
        axis = np.arange(SIDE)[None, :] if rng.random() < 0.5 else np.arange(SIDE)[:, None]
        out = np.broadcast_to(255.0 * (np.sin(2 * np.pi * axis / period) > 0), shape)
    elif family == "checker":
        cell = int(rng.integers(2, 7))
        yy, xx = np.mgrid[:SIDE, :SIDE] // cell
        out = 255.0 * ((yy + xx) % 2)
    elif family == "grey":
        out = np.full(shape, rng.uniform(30, 200))
    elif family == "dots":
        out = np.zeros(shape)
        for _ in range(int(rng.integers(8, 30))):
            out[rng.integers(0, SIDE), rng.integers(0, SIDE)] = 255
        out = ndimage.grey_dilation(out, size=(2, 2))
    elif family == "pixels":
        out = np.zeros(shape)
        for _ in range(int(rng.integers(2, 4))):
            out[rng.integers(2, 26), rng.integers(2, 26)] = rng.uniform(128, 255)
    else:  # salt_pepper_dense
        out = np.where(rng.random(shape) < rng.uniform(0.3, 0.6), 255.0, 0.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def garment_polygons(family: str, rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Polygons (unit box, y down) of one garment; a few are drawn as several parts."""
    w = rng.uniform(-0.04, 0.04, size=12)  # proportions wobble
    if family == "tshirt":
        return [[(0.3, 0.1), (0.42, 0.08), (0.5, 0.14), (0.58, 0.08), (0.7, 0.1), (0.95 + w[0], 0.3),
                 (0.85, 0.42 + w[1]), (0.74, 0.34), (0.74, 0.95), (0.26, 0.95), (0.26, 0.34),
                 (0.15, 0.42 + w[1]), (0.05 - w[0], 0.3)]]
    if family == "pullover":
        return [[(0.3, 0.08), (0.5, 0.13), (0.7, 0.08), (0.92, 0.25), (0.98, 0.9), (0.84, 0.9),
                 (0.76, 0.4), (0.76, 0.94), (0.24, 0.94), (0.24, 0.4), (0.16, 0.9), (0.02, 0.9), (0.08, 0.25)]]
    if family == "coat":
        return [[(0.3, 0.05), (0.5, 0.2), (0.7, 0.05), (0.9, 0.2), (0.97, 0.95), (0.85, 0.95),
                 (0.78, 0.45), (0.8, 0.98), (0.2, 0.98), (0.22, 0.45), (0.15, 0.95), (0.03, 0.95), (0.1, 0.2)]]
    if family == "trouser":
        gap = 0.5 + w[2]
        return [[(0.28, 0.03), (0.72, 0.03), (0.78 + w[3], 0.97), (gap + 0.06, 0.97), (gap, 0.3),
                 (gap - 0.06, 0.97), (0.22 - w[3], 0.97)]]
    if family == "dress":
        return [[(0.38, 0.03), (0.46, 0.08), (0.54, 0.08), (0.62, 0.03), (0.66, 0.3), (0.6, 0.42),
                 (0.88 + w[4], 0.97), (0.12 - w[4], 0.97), (0.4, 0.42), (0.34, 0.3)]]
    if family == "skirt":
        return [[(0.32, 0.15), (0.68, 0.15), (0.7, 0.25), (0.92 + w[4], 0.85), (0.08 - w[4], 0.85), (0.3, 0.25)]]
    if family == "sneaker":
        return [[(0.03, 0.55), (0.3, 0.4), (0.5, 0.3), (0.62, 0.35), (0.8, 0.55 + w[5]), (0.97, 0.65),
                 (0.97, 0.8), (0.03, 0.8)]]
    if family == "sandal":
        return [[(0.03, 0.72), (0.97, 0.66), (0.97, 0.8), (0.03, 0.82)],
                [(0.2, 0.72), (0.35, 0.45), (0.42, 0.47), (0.3, 0.72)],
                [(0.55, 0.7), (0.65, 0.42), (0.72, 0.44), (0.65, 0.7)],
                [(0.8, 0.68), (0.85, 0.5), (0.92, 0.52), (0.9, 0.67)]]
    if family == "ankle_boot":
        return [[(0.3, 0.05), (0.62, 0.05), (0.64, 0.5), (0.92, 0.68), (0.97, 0.95), (0.05, 0.95),
                 (0.1 + w[6], 0.6)]]
    if family == "bag":
        return [[(0.05, 0.35), (0.95, 0.35), (0.9 + w[7], 0.95), (0.1 - w[7], 0.95)],
                [(0.3, 0.35), (0.35, 0.1), (0.65, 0.1), (0.7, 0.35), (0.62, 0.35), (0.6, 0.17),
                 (0.4, 0.17), (0.38, 0.35)]]
    # handbag: trapezoid with a round handle drawn by `garment`
    return [[(0.2, 0.45), (0.8, 0.45), (0.97, 0.95), (0.03, 0.95)]]


def garment(rng: np.random.Generator, split: str) -> np.ndarray:
    family = str(rng.choice(CLOTHES[split]))
    mask_image = Image.new("L", (WORK, WORK), 0)
    draw = ImageDraw.Draw(mask_image)
    margin = 6
    scale_x = (WORK - 2 * margin) * rng.uniform(0.85, 1.0)
    scale_y = (WORK - 2 * margin) * rng.uniform(0.85, 1.0)
    for poly in garment_polygons(family, rng):
        draw.polygon([(margin + x * scale_x, margin + y * scale_y) for x, y in poly], fill=255)
    if family == "handbag":
        draw.arc((margin + 0.3 * scale_x, margin + 0.1 * scale_y, margin + 0.7 * scale_x, margin + 0.75 * scale_y),
                 180, 360, fill=255, width=int(rng.integers(5, 10)))
    if rng.random() < 0.5:
        mask_image = mask_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask_image = mask_image.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR)
    mask = np.asarray(mask_image, dtype=np.float32) / 255.0
    # grey shading: a base level, a gradient, soft texture, darker seams
    yy, xx = np.mgrid[:WORK, :WORK] / WORK
    angle = rng.uniform(0, 2 * np.pi)
    shade = rng.uniform(90, 220) + rng.uniform(-50, 50) * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    shade = shade + ndimage.gaussian_filter(rng.normal(0, 1, (WORK, WORK)), 3) * rng.uniform(20, 60)
    if rng.random() < 0.5:  # a pattern (stripes or checks), as many Fashion-MNIST items have
        period = rng.uniform(8, 20)
        shade = shade - rng.uniform(20, 70) * (np.sin(2 * np.pi * (yy if rng.random() < 0.5 else xx) * WORK / period) > 0)
    return np.clip(shade, 40, 255) * mask


def generate(kind: str, count: int, seed: int = 0, split: str = "calibration") -> np.ndarray:
    """`count` non-digit pictures of `kind` as uint8 (count, 28, 28); same arguments, same pictures."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    rng = rng_for(kind, seed, split)
    out = np.zeros((int(count), SIDE, SIDE), dtype=np.uint8)
    for index in range(int(count)):
        if kind == "noise_blank":
            out[index] = noise(rng, split)
            continue
        draw = {"letters_symbols": letter, "doodles": doodle, "clothing": garment}[kind]
        out[index] = mnist_frame(draw(rng, split))
    return out


def generate_all(count: int, seed: int = 0, split: str = "calibration") -> dict[str, np.ndarray]:
    return {kind: generate(kind, count, seed, split) for kind in KINDS}
