"""Generates the handwriting-like digit pictures the model never trains on (`tests/handwriting/`).

Half the pictures are digits of handwriting-style fonts (Debian `fonts-*` packages), half are
synthesised pen strokes; all are slanted, rotated (+-15 degrees), warped, blurred and noised,
on paper or board of several colours, and saved as PNG, JPEG or BMP. The true label is in each
file name (`0123_7.png`) and in `labels.csv`. The same seed and fonts give the same set.

    python -m tools.handwriting [--out tests/handwriting] [--count 400] [--seed 7]

A tool, not part of the installed package: the `evaluate` stage scores every model on the set
(`pipeline.serving.handwriting`) and writes the score as a DVC metric.
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage


class GeneratorError(Exception):
    """A font or setting the generator cannot use."""


log = logging.getLogger(__name__)

DEFAULT_FOLDER = "tests/handwriting"
LABELS_FILE = "labels.csv"
FONT_DIR = Path("/usr/share/fonts")

# Handwriting-style fonts, by file name, with the Debian package that ships each.
HANDWRITING_FONTS = {
    "BecauseWeBuild-Regular.otf": "fonts-bwht",
    "BecauseWeConnect-Regular.otf": "fonts-bwht",
    "BecauseWeCreate-Regular.otf": "fonts-bwht",
    "BecauseWeLearn-Regular.otf": "fonts-bwht",
    "BecauseWeMentor-Regular.otf": "fonts-bwht",
    "BecauseWeOrganize-Regular.otf": "fonts-bwht",
    "ComicNeue-Regular.otf": "fonts-comic-neue",
    "ComicNeue-Italic.otf": "fonts-comic-neue",
    "ComicNeue-Light.otf": "fonts-comic-neue",
    "ComicNeue-Bold.otf": "fonts-comic-neue",
    "DancingScript-Regular.otf": "fonts-dancingscript",
    "DancingScript-Bold.otf": "fonts-dancingscript",
    "KaushanScript-Regular.otf": "fonts-kaushanscript",
    "Breip.ttf": "fonts-breip",
    "dkg.ttf": "fonts-dkg-handwriting",
    "dkgBd.ttf": "fonts-dkg-handwriting",
    "dkgIt.ttf": "fonts-dkg-handwriting",
    "dkgBI.ttf": "fonts-dkg-handwriting",
    "Humor-Sans.ttf": "fonts-humor-sans",
    "KleeOne-Regular.ttf": "fonts-klee",
    "KleeOne-SemiBold.ttf": "fonts-klee",
    "Kristi.ttf": "fonts-kristi",
    "Rufscript010.ttf": "fonts-rufscript",
}
# A few print fonts, as people also write digits that way (and forms often do).
PRINT_FONTS = {
    "FreeSans.ttf": "fonts-freefont-ttf",
    "LiberationSans-Regular.ttf": "fonts-liberation",
    "LiberationSans-Italic.ttf": "fonts-liberation",
    "LiberationSansNarrow-Regular.ttf": "fonts-liberation",
    "DejaVuSans.ttf": "fonts-dejavu-core",
}
PRINT_SHARE = 0.15
ITALIC_FONTS = {"ComicNeue-Italic", "dkgIt", "dkgBI", "Kristi", "KaushanScript-Regular", "LiberationSans-Italic"}
MIN_DIGIT_PX = 16  # digits smaller than this in a photo or scan are not legible to people either  # of the font-rendered pictures

Point = tuple[float, float]
Stroke = list[Point]

# Pen-stroke skeletons in a unit box (x right, y down); each digit has a few ways to write it.
# A stroke is a list of points joined by a smooth curve; a corner is where two strokes meet.
DIGIT_STROKES: dict[int, list[list[Stroke]]] = {
    0: [
        [[(0.5, 0.04), (0.24, 0.18), (0.18, 0.5), (0.26, 0.84), (0.5, 0.96), (0.74, 0.84), (0.8, 0.5),
          (0.74, 0.16), (0.5, 0.04), (0.42, 0.08)]],
        [[(0.55, 0.05), (0.3, 0.12), (0.2, 0.45), (0.3, 0.88), (0.52, 0.95), (0.72, 0.8), (0.76, 0.42),
          (0.66, 0.1), (0.5, 0.06)]],
    ],
    1: [
        [[(0.5, 0.04), (0.5, 0.96)]],
        [[(0.38, 0.18), (0.56, 0.04)], [(0.56, 0.04), (0.54, 0.96)]],
        [[(0.36, 0.18), (0.55, 0.04)], [(0.55, 0.04), (0.55, 0.95)], [(0.32, 0.95), (0.78, 0.95)]],
        [[(0.58, 0.04), (0.52, 0.5), (0.44, 0.96)]],
    ],
    2: [
        [[(0.2, 0.26), (0.34, 0.08), (0.58, 0.04), (0.78, 0.2), (0.72, 0.44), (0.46, 0.7), (0.18, 0.95)],
         [(0.18, 0.95), (0.52, 0.93), (0.84, 0.95)]],
        [[(0.22, 0.22), (0.45, 0.04), (0.72, 0.1), (0.76, 0.34), (0.5, 0.64), (0.2, 0.92)],
         [(0.2, 0.92), (0.3, 0.82), (0.42, 0.9), (0.6, 0.95), (0.84, 0.9)]],
    ],
    3: [
        [[(0.22, 0.16), (0.48, 0.04), (0.74, 0.14), (0.7, 0.36), (0.44, 0.48)],
         [(0.44, 0.48), (0.74, 0.58), (0.8, 0.8), (0.52, 0.96), (0.2, 0.86)]],
        [[(0.2, 0.08), (0.78, 0.08)], [(0.78, 0.08), (0.46, 0.42)],
         [(0.46, 0.42), (0.76, 0.56), (0.78, 0.82), (0.5, 0.96), (0.2, 0.86)]],
    ],
    4: [
        [[(0.62, 0.04), (0.16, 0.66)], [(0.16, 0.66), (0.86, 0.66)], [(0.66, 0.3), (0.66, 0.97)]],
        [[(0.26, 0.04), (0.2, 0.55)], [(0.2, 0.55), (0.82, 0.55)], [(0.7, 0.06), (0.68, 0.97)]],
        [[(0.3, 0.06), (0.22, 0.5), (0.4, 0.56), (0.8, 0.5)], [(0.68, 0.08), (0.64, 0.96)]],
    ],
    5: [
        [[(0.78, 0.06), (0.3, 0.06)], [(0.3, 0.06), (0.26, 0.46)],
         [(0.26, 0.46), (0.5, 0.38), (0.76, 0.52), (0.78, 0.8), (0.5, 0.96), (0.2, 0.88)]],
        [[(0.3, 0.06), (0.26, 0.44), (0.52, 0.38), (0.76, 0.56), (0.74, 0.84), (0.46, 0.96), (0.2, 0.86)],
         [(0.3, 0.07), (0.78, 0.05)]],
    ],
    6: [
        [[(0.7, 0.05), (0.42, 0.2), (0.26, 0.5), (0.26, 0.8), (0.5, 0.96), (0.74, 0.8), (0.72, 0.58),
          (0.5, 0.5), (0.27, 0.62)]],
        [[(0.62, 0.04), (0.36, 0.34), (0.24, 0.7), (0.36, 0.93), (0.6, 0.94), (0.74, 0.74), (0.6, 0.54),
          (0.36, 0.58), (0.26, 0.7)]],
    ],
    7: [
        [[(0.18, 0.08), (0.82, 0.08)], [(0.82, 0.08), (0.56, 0.5), (0.4, 0.97)]],
        [[(0.18, 0.14), (0.22, 0.07), (0.82, 0.07)], [(0.82, 0.07), (0.46, 0.97)], [(0.34, 0.52), (0.76, 0.5)]],
        [[(0.2, 0.08), (0.8, 0.1)], [(0.8, 0.1), (0.6, 0.48), (0.5, 0.96)]],
    ],
    8: [
        [[(0.5, 0.48), (0.26, 0.3), (0.3, 0.08), (0.5, 0.04), (0.7, 0.1), (0.72, 0.3), (0.5, 0.48),
          (0.24, 0.7), (0.3, 0.92), (0.5, 0.97), (0.72, 0.9), (0.76, 0.7), (0.5, 0.48)]],
        [[(0.7, 0.12), (0.5, 0.04), (0.3, 0.1), (0.32, 0.32), (0.7, 0.62), (0.72, 0.88), (0.5, 0.97),
          (0.28, 0.88), (0.3, 0.64), (0.68, 0.32), (0.7, 0.12)]],
    ],
    9: [
        [[(0.74, 0.24), (0.6, 0.05), (0.35, 0.06), (0.24, 0.26), (0.38, 0.44), (0.62, 0.42), (0.74, 0.24)],
         [(0.74, 0.24), (0.72, 0.97)]],
        [[(0.74, 0.22), (0.56, 0.04), (0.3, 0.1), (0.28, 0.34), (0.5, 0.44), (0.74, 0.3)],
         [(0.75, 0.12), (0.74, 0.6), (0.6, 0.96)]],
    ],
}


@dataclass(frozen=True)
class Style:
    """How one picture looks: colours in RGB, sizes in pixels."""

    paper: tuple[int, int, int]
    ink: tuple[int, int, int]
    canvas: int
    digit_height: int
    blur: float
    noise: float
    lighting: float  # strength of a lighting gradient across the picture, 0-1
    ruled: bool  # faint ruled lines, as on notebook paper
    fmt: str  # png, jpg or bmp
    grey: bool


# --- drawing -------------------------------------------------------------------------------


def catmull_rom(points: np.ndarray, samples: int = 24) -> np.ndarray:
    """A smooth curve through the points (centripetal-free, uniform Catmull-Rom)."""
    if len(points) < 3:
        t = np.linspace(0.0, 1.0, samples * max(len(points) - 1, 1))[:, None]
        return points[0] + t * (points[-1] - points[0])
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        pieces.append(
            0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    pieces.append(points[-1][None, :])
    return np.vstack(pieces)


def random_affine(rng: np.random.Generator, italic: bool = False) -> np.ndarray:
    """A 2x2 map: slant, rotation within +-15 degrees, and width/height change.

    Shear k moves the bottom right by k per unit height: k < 0 leans forward like italics, so
    glyphs that are italic already are sheared mostly upright, keeping slants people write.
    """
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, rng.uniform(-0.1, 0.35) if italic else rng.uniform(-0.3, 0.3)], [0.0, 1.0]])
    scale = np.diag([rng.uniform(0.75, 1.2), 1.0])
    return rotation @ shear @ scale


def draw_strokes(digit: int, rng: np.random.Generator, height: int) -> np.ndarray:
    """Ink coverage (0-1) of a pen-written digit about `height` pixels tall, tightly cropped."""
    variant = DIGIT_STROKES[digit][rng.integers(len(DIGIT_STROKES[digit]))]
    transform = random_affine(rng)
    jitter = rng.uniform(0.01, 0.035)
    supersample = 3
    size = height * supersample
    pen = size * rng.uniform(0.05, 0.13)
    margin = int(pen * 2 + size * 0.6)
    canvas = Image.new("L", (size + 2 * margin, size + 2 * margin), 0)
    draw = ImageDraw.Draw(canvas)
    shared = {}  # stroke ends that meet stay joined after jitter
    for stroke in variant:
        points = []
        for point in stroke:
            if point not in shared:
                shared[point] = np.asarray(point) + rng.normal(0.0, jitter, 2)
            points.append(shared[point])
        curve = catmull_rom(np.asarray(points))
        curve = (curve - 0.5) @ transform.T * size + size / 2 + margin
        pressure = 1.0 + 0.25 * np.sin(np.linspace(0, rng.uniform(2, 7), len(curve)) + rng.uniform(0, 6.3))
        for (x, y), p in zip(curve, pressure):
            r = pen * p / 2.0
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    image = canvas.crop(canvas.getbbox())
    image = image.resize((max(1, image.width // supersample), max(1, image.height // supersample)), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def draw_font(digit: int, font_path: Path, rng: np.random.Generator, height: int) -> np.ndarray:
    """Ink coverage (0-1) of a font's digit, slanted, rotated, thickened or thinned, cropped."""
    size = height * 3
    font = ImageFont.truetype(str(font_path), size)
    canvas = Image.new("L", (size * 3, size * 3), 0)
    draw = ImageDraw.Draw(canvas)
    weight = int(rng.choice([0, 0, 0, 1, 2, 3])) * max(1, size // 60)  # outline adds weight
    draw.text((size, size // 2), str(digit), font=font, fill=255, stroke_width=weight, stroke_fill=255)
    ink = np.asarray(canvas, dtype=np.float32) / 255.0
    if rng.random() < 0.25:  # a finer pen than the font's
        ink = ndimage.grey_erosion(ink, size=(max(2, size // 40),) * 2)
    transform = random_affine(rng, italic=font_path.stem in ITALIC_FONTS)
    centre = np.array(ink.shape) / 2.0
    matrix = np.linalg.inv(transform[::-1, ::-1])  # (row, col) order for scipy
    ink = ndimage.affine_transform(ink, matrix, offset=centre - matrix @ centre, order=1)
    image = Image.fromarray((np.clip(ink, 0, 1) * 255).astype(np.uint8))
    box = image.getbbox()
    if box is None:
        raise GeneratorError(f"font {font_path.name} draws no '{digit}'; remove it from HANDWRITING_FONTS")
    image = image.crop(box)
    scale = height / image.height
    image = image.resize((max(1, round(image.width * scale)), height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def warp(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gentle elastic wobble, as a hand is never as steady as a font."""
    height, width = ink.shape
    pad = max(2, height // 8)
    ink = np.pad(ink, pad)
    sigma = max(ink.shape) / 6.0
    amplitude = rng.uniform(0.0, 0.035) * max(ink.shape)
    shifts = [ndimage.gaussian_filter(rng.normal(size=ink.shape), sigma) for _ in range(2)]
    shifts = [s / (np.abs(s).max() + 1e-9) * amplitude for s in shifts]
    rows, cols = np.meshgrid(np.arange(ink.shape[0]), np.arange(ink.shape[1]), indexing="ij")
    return ndimage.map_coordinates(ink, [rows + shifts[0], cols + shifts[1]], order=1)


def crop(ink: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero((ink > 0.01).any(axis=1))
    cols = np.flatnonzero((ink > 0.01).any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] if rows.size else ink


def fit_within(ink: np.ndarray, side: int) -> np.ndarray:
    """Shrink ink that is wider or taller than the picture (a wide glyph, a wobble)."""
    scale = side / max(ink.shape)
    if scale >= 1.0:
        return ink
    size = (max(1, int(ink.shape[1] * scale)), max(1, int(ink.shape[0] * scale)))
    return np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


# --- the picture ---------------------------------------------------------------------------


def pick_style(rng: np.random.Generator) -> Style:
    kind = rng.random()
    if kind < 0.15:  # light on dark: chalk on a board, or a white pen on black
        paper = tuple(int(v) for v in rng.choice([[30, 50, 40], [20, 20, 24], [40, 40, 60], [0, 0, 0]]))
        ink = tuple(int(v) for v in rng.choice([[240, 240, 235], [250, 240, 170], [220, 230, 255]]))
    else:
        paper = tuple(int(v) for v in rng.choice(
            [[255, 255, 255], [246, 242, 228], [235, 235, 235], [250, 248, 240], [215, 210, 200], [255, 250, 205]]
        ))
        ink = tuple(int(v) for v in rng.choice(
            [[10, 10, 10], [30, 30, 40], [20, 40, 140], [60, 60, 60], [110, 110, 110], [150, 20, 30]]
        ))
    # Sizes and formats keep the set small enough to commit: grain goes mostly to JPEGs,
    # BMPs (uncompressed) are grey and small.
    fmt = str(rng.choice(["png", "png", "png", "jpg", "jpg", "bmp"]))
    canvas = int(rng.integers(32, 97 if fmt == "bmp" else 129))
    digit_height = max(MIN_DIGIT_PX, int(canvas * rng.uniform(0.4, 0.85)))
    noise_levels = [0.0, 0.0, 3.0] if fmt == "png" else [0.0, 3.0, 6.0, 10.0]
    return Style(
        paper=paper,
        ink=ink,
        canvas=canvas,
        digit_height=digit_height,
        blur=float(rng.choice([0.0, 0.0, 0.5, 0.8, 1.2])) * float(np.clip(digit_height / 32.0, 0.5, 2.0)),
        noise=float(rng.choice(noise_levels)),
        lighting=float(rng.choice([0.0, 0.0, 0.2, 0.35])),
        ruled=bool(rng.random() < 0.1),
        fmt=fmt,
        grey=fmt == "bmp" or bool(rng.random() < 0.5),
    )


def compose(ink: np.ndarray, style: Style, rng: np.random.Generator) -> Image.Image:
    """Put the ink on paper: position, colours, ruled lines, uneven light, blur and grain."""
    side = style.canvas
    coverage = np.zeros((side, side), dtype=np.float32)
    ink = fit_within(ink, side)
    top = int(rng.integers(0, side - ink.shape[0] + 1))
    left = int(rng.integers(0, side - ink.shape[1] + 1))
    coverage[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    paper = np.ones((side, side, 3), dtype=np.float32) * np.asarray(style.paper, dtype=np.float32)
    if style.ruled:
        for y in range(int(rng.integers(0, 12)), side, max(12, side // 4)):
            paper[y, :] = paper[y, :] * 0.85 + np.array([120, 150, 220]) * 0.15
    picture = paper * (1 - coverage[..., None]) + np.asarray(style.ink, dtype=np.float32) * coverage[..., None]
    if style.lighting:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:side, 0:side] / side
        ramp = (np.cos(angle) * xs + np.sin(angle) * ys)
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
        picture = picture * (1.0 - style.lighting * ramp[..., None])
    image = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        grain = rng.normal(0.0, style.noise, (side, side, 1))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    return image.convert("L") if style.grey else image


def available_fonts(names: dict[str, str]) -> list[Path]:
    """Font files of `names` found under /usr/share/fonts, in a fixed order."""
    found = {path.name: path for path in FONT_DIR.rglob("*") if path.name in names}
    missing = sorted({names[name] for name in names if name not in found})
    if missing:
        log.warning("fonts missing (apt-get install %s); the set will differ from the committed one", " ".join(missing))
    return [found[name] for name in sorted(found)]


def generate(out_dir: Path, count: int = 400, seed: int = 7) -> list[dict[str, Any]]:
    """Write `count` pictures (labels balanced) and labels.csv; returns the label rows."""
    handwriting = available_fonts(HANDWRITING_FONTS)
    printed = available_fonts(PRINT_FONTS)
    if not handwriting:
        raise GeneratorError(
            "no handwriting fonts found; apt-get install " + " ".join(sorted(set(HANDWRITING_FONTS.values())))
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("[0-9][0-9][0-9][0-9]_[0-9].*"):
        old.unlink()
    rows = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        digit = index % 10
        style = pick_style(rng)
        if index % 2 == 0:
            pool = printed if printed and rng.random() < PRINT_SHARE else handwriting
            font = pool[int(rng.integers(len(pool)))]
            ink, source = draw_font(digit, font, rng, style.digit_height), font.stem
        else:
            ink, source = draw_strokes(digit, rng, style.digit_height), "strokes"
        ink = crop(warp(ink, rng))
        image = compose(ink, style, rng)
        name = f"{index:04d}_{digit}.{style.fmt}"
        if style.fmt == "jpg":
            image.save(out_dir / name, quality=int(rng.integers(70, 92)))
        else:
            image.save(out_dir / name)
        polarity = "light-on-dark" if sum(style.paper) < sum(style.ink) else "dark-on-light"
        rows.append({"file": name, "label": digit, "source": source, "polarity": polarity})
    with open(out_dir / LABELS_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "source", "polarity"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.handwriting", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_FOLDER, help=f"folder (default: {DEFAULT_FOLDER})")
    parser.add_argument("--count", type=int, default=400, help="number of pictures (default: 400)")
    parser.add_argument("--seed", type=int, default=7, help="seed (default: 7)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = generate(Path(args.out), args.count, args.seed)
    print(f"wrote {len(rows)} pictures and {LABELS_FILE} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
