"""How well each digit-verdict method tells digits from generated non-digits, on one model.

    python bench/ood.py --model models/model.keras --data data/prepared --handwriting tests/handwriting

Runs the model once (probabilities and `export.with_features`'s features) on: a training subset
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

from pipeline.core import nondigits, ood, verdict  # noqa: E402


def collect(model_path: Path, data_dir: Path, handwriting_dir: Path, count: int, train_count: int,
            seed: int = 0) -> dict[str, np.ndarray]:
    """Every input the verdict is fitted and measured on, with the Keras model's outputs."""
    import keras

    from pipeline.core.export import classifier_head, with_features
    from pipeline.serving.handwriting import prepared_pixels

    model = keras.saving.load_model(model_path)
    both = with_features(model)
    weights, bias = [np.asarray(w) for w in classifier_head(model).get_weights()]
    out: dict[str, np.ndarray] = {"weights": weights, "bias": bias}

    def run(name: str, pixels: np.ndarray) -> None:
        seen = ood.look(lambda x: both.predict(x[..., None], batch_size=1024, verbose=0), pixels)
        out[f"{name}/p"], out[f"{name}/f"], out[f"{name}/x"] = seen.parts()

    for split in ("train", "val", "test"):
        with np.load(data_dir / f"{split}.npz") as data:
            x, y = data["x"], data["y"]
        if split == "train":
            x, y = ood.subsample(x, y, train_count, seed)
        run(split, x)
        out[f"{split}/y"] = y
    hand, total = prepared_pixels(handwriting_dir)
    run("handwriting", hand)
    out["handwriting/total"] = np.array(total)
    for split in nondigits.SPLITS:
        for kind, pixels in ood.generated(split, count, seed).items():
            run(f"{split}/{kind}", pixels)
    return out


def seen(data: dict[str, np.ndarray], name: str) -> ood.Seen:
    return ood.Seen(data[f"{name}/p"], data[f"{name}/f"], data[f"{name}/x"])


def kinds(data: dict[str, np.ndarray], split: str) -> dict[str, ood.Seen]:
    return {kind: seen(data, f"{split}/{kind}") for kind in nondigits.KINDS}


def fit(method: str, data: dict[str, np.ndarray], target: float) -> verdict.VerdictState:
    return ood.fit(method, target, data["weights"], data["bias"], seen(data, "train"), data["train/y"],
                   seen(data, "val"), kinds(data, "calibration"))


def measure(state: verdict.VerdictState, data: dict[str, np.ndarray]) -> dict:
    return ood.report(state, seen(data, "val"), seen(data, "test"), seen(data, "handwriting"),
                      int(data["handwriting/total"]), kinds(data, "heldout"), kinds(data, "calibration"))


def table(results: dict[str, dict[str, object]]) -> str:
    kinds = nondigits.KINDS
    short = {"letters_symbols": "letters", "doodles": "doodles", "noise_blank": "noise", "clothing": "clothing"}
    lines = []
    for split in nondigits.SPLITS:
        lines.append(f"\n{split} non-digits (AUROC vs test digits / rejected at the validation threshold)\n")
        head = "| method | test acc. | handwr. acc. | " + " | ".join(f"{short[k]} AUROC | {short[k]} rej." for k in kinds) + " |"
        lines += [head, "|" + "---|" * (3 + 2 * len(kinds))]
        for method, row in results.items():
            cells = [f"{100 * row['accepted']['test_digits']:.2f} %", f"{100 * row['accepted']['handwriting']:.2f} %"]
            for kind in kinds:
                cells += [f"{row[split][kind]['auroc']:.4f}", f"{100 * row[split][kind]['rejected']:.1f} %"]
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
