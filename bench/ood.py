"""How well each digit-verdict method tells digits from generated non-digits, on one model.

    python bench/ood.py --model models/model.keras --data data/prepared --handwriting tests/handwriting

Runs the model once (probabilities and `verdict.feature_model`'s features) on: a training subset
(Mahalanobis statistics), validation (guards, threshold, combined fit), test, the handwriting set
and the generated non-digits of both splits. For each method it prints AUROC per kind (test digits
= positive against that kind), the rejection rate per kind at the threshold chosen on validation
(target acceptance 0.995), and the acceptance of test and handwriting digits. `--cache` keeps the
model outputs so that reruns take seconds; `--state` saves the chosen (combined) verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pipeline.core import nondigits, verdict  # noqa: E402

TARGETS = {"test_accept": 0.995, "handwriting_accept": 0.97, "letters_symbols": 0.90, "doodles": 0.90,
           "clothing": 0.95, "noise_blank": 1.0, "auroc": 0.98}


def handwriting_pixels(folder: Path) -> tuple[np.ndarray, int]:
    """The handwriting set as the serving path prepares it; also how many pictures failed to prepare."""
    from pipeline.serving.handwriting import read_labels
    from pipeline.serving.images import ImageError, prepare_image, read_image

    pixels, failed = [], 0
    for row in read_labels(folder):
        try:
            pixels.append(prepare_image(read_image(folder / row["file"])))
        except ImageError:
            failed += 1
    return np.stack(pixels).astype(np.float32), failed


def collect(model_path: Path, data_dir: Path, handwriting_dir: Path, count: int, train_count: int,
            seed: int = 0) -> dict[str, np.ndarray]:
    import keras

    model = keras.saving.load_model(model_path)
    both = verdict.feature_model(model)
    head = model.layers[-1]
    weights, bias = [np.asarray(w) for w in head.get_weights()]
    out: dict[str, np.ndarray] = {"weights": weights, "bias": bias}

    def run(name: str, pixels: np.ndarray) -> None:
        pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28)
        probabilities, features = both.predict(pixels[..., None], batch_size=1024, verbose=0)
        out[f"{name}/p"], out[f"{name}/f"], out[f"{name}/x"] = probabilities, features, pixels.astype(np.uint8)

    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        with np.load(data_dir / f"{split}.npz") as data:
            x, y = data["x"], data["y"]
        if split == "train" and train_count < len(x):
            keep = np.sort(rng.choice(len(x), train_count, replace=False))
            x, y = x[keep], y[keep]
        run(split, x)
        out[f"{split}/y"] = y
    hand, failed = handwriting_pixels(handwriting_dir)
    run("handwriting", np.round(np.clip(hand, 0, 255)))
    out["handwriting/failed"] = np.array(failed)
    for split in nondigits.SPLITS:
        for kind in nondigits.KINDS:
            run(f"{split}/{kind}", nondigits.generate(kind, count, seed=seed if split == "calibration" else seed + 1000,
                                                      split=split))
    return out


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    pos = np.nan_to_num(positive, neginf=-1e300)
    neg = np.nan_to_num(negative, neginf=-1e300)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def fit(method: str, data: dict[str, np.ndarray], target: float) -> verdict.VerdictState:
    negatives = tuple(np.concatenate([data[f"calibration/{kind}/{part}"] for kind in nondigits.KINDS])
                      for part in ("p", "f", "x"))
    return verdict.fit_verdict(method, data["val/p"], data["val/f"], data["val/x"], target,
                               weights=data["weights"], bias=data["bias"],
                               train=(data["train/p"], data["train/f"], data["train/x"], data["train/y"]),
                               negatives=negatives)


def measure(state: verdict.VerdictState, data: dict[str, np.ndarray]) -> dict[str, object]:
    def score(name: str) -> np.ndarray:
        return verdict.digit_scores(state, data[f"{name}/p"], data[f"{name}/f"], data[f"{name}/x"])

    test, hand = score("test"), score("handwriting")
    hand_total = len(hand) + int(data["handwriting/failed"])
    row: dict[str, object] = {"threshold": state.threshold, "val_accept": float(np.mean(score("val") >= state.threshold)),
                              "test_accept": float(np.mean(test >= state.threshold)),
                              "handwriting_accept": float(np.sum(hand >= state.threshold) / hand_total)}
    for split in nondigits.SPLITS:
        for kind in nondigits.KINDS:
            negative = score(f"{split}/{kind}")
            row[f"{split}/{kind}/auroc"] = auroc(test, negative)
            row[f"{split}/{kind}/rejected"] = float(np.mean(negative < state.threshold))
    return row


def table(results: dict[str, dict[str, object]]) -> str:
    kinds = nondigits.KINDS
    short = {"letters_symbols": "letters", "doodles": "doodles", "noise_blank": "noise", "clothing": "clothing"}
    lines = []
    for split in nondigits.SPLITS:
        lines.append(f"\n{split} non-digits (AUROC vs test digits / rejected at the validation threshold)\n")
        head = "| method | test acc. | handwr. acc. | " + " | ".join(f"{short[k]} AUROC | {short[k]} rej." for k in kinds) + " |"
        lines += [head, "|" + "---|" * (3 + 2 * len(kinds))]
        for method, row in results.items():
            cells = [f"{100 * row['test_accept']:.2f} %", f"{100 * row['handwriting_accept']:.2f} %"]
            for kind in kinds:
                cells += [f"{row[f'{split}/{kind}/auroc']:.4f}", f"{100 * row[f'{split}/{kind}/rejected']:.1f} %"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("\ntargets: test >= 99.5 %, handwriting >= 97 %, letters >= 90 %, doodles >= 90 %, "
                 "clothing >= 95 %, noise 100 %, AUROC >= 0.98")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/val/test.npz")
    parser.add_argument("--handwriting", type=Path, required=True, help="folder with labels.csv and pictures")
    parser.add_argument("--count", type=int, default=1000, help="non-digits per kind and split")
    parser.add_argument("--train-count", type=int, default=10000, help="training digits for Mahalanobis")
    parser.add_argument("--target", type=float, default=0.995, help="acceptance of validation digits")
    parser.add_argument("--cache", type=Path, help="npz of model outputs: read if present, else written")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--state", type=Path, help="save the best (combined) verdict state here")
    args = parser.parse_args(argv)
    if args.cache and args.cache.is_file():
        with np.load(args.cache) as cached:
            data = {key: cached[key] for key in cached.files}
    else:
        data = collect(args.model, args.data, args.handwriting, args.count, args.train_count)
        if args.cache:
            np.savez_compressed(args.cache, **data)
    results = {}
    for method in verdict.METHODS:
        state = fit(method, data, args.target)
        results[method] = measure(state, data)
        if args.state and method == "combined":
            verdict.save_state(state, args.state)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
