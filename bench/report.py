"""Results as a JSON record and a Markdown table for the README."""

from __future__ import annotations

import json
import os
from pathlib import Path

MISSING = "—"


def number(value, spec: str = ".1f", suffix: str = "") -> str:
    return MISSING if value is None else f"{value:{spec}}{suffix}"


def percent(value) -> str:
    return MISSING if value is None else f"{100 * value:.2f} %"


def times(value) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LIBRARY_LABELS = {"tensorflow": "TensorFlow", "keras": "Keras", "mlflow": "MLflow", "onnxruntime": "ONNX Runtime",
                  "uvicorn": "uvicorn"}


def machine_line(machine: dict) -> str:
    load = machine.get("load_average_1m_at_start")
    libraries = "".join(f", {label} {machine[key]}" for key, label in LIBRARY_LABELS.items() if machine.get(key))
    return (f"{machine['cpu_model']}, {machine['usable_cores']} usable core(s){libraries}, "
            f"Python {machine['python']}, {machine['date'][:10]}"
            + (f", load average {load} at start" if load is not None else ""))


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results(out_dir: Path, stem: str, record: dict, markdown: str) -> tuple[Path, Path]:
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomically(json_path, json.dumps(record, indent=2) + "\n")
    write_atomically(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


# ---- the two tables ---------------------------------------------------------------------------------

def model_label(model: dict) -> str:
    notes = [note for note, on in (("tuned", model["tuned"]), ("bf16", model["dtype_policy"] != "float32")) if on]
    return f"{model['role']}: `{model['preset']}`" + (f" ({', '.join(notes)})" if notes else "")


def train_markdown(record: dict) -> str:
    reference, default = record["models"]["reference"], record["models"]["default"]
    ratios = record["ratios_default_over_reference"]

    def row(label, value, ratio_value=None, show_ratio=False):
        return [label, value(reference), value(default), times(ratio_value) if show_ratio else ""]

    rows = [
        row("Epochs trained", lambda m: str(m["epochs"])),
        row("Parameters", lambda m: f"{m['parameters']:,}"),
    ]
    for key in reference["to_accuracy"]:
        slug = key.replace(".", "_")
        rows.append(row(f"Epochs to {key} % test accuracy", lambda m, k=key: number(m["to_accuracy"][k]["epochs"], "d")))
        rows.append(row(f"Training time to {key} % (s)", lambda m, k=key: number(m["to_accuracy"][k]["seconds"]),
                        ratios[f"time_to_{slug}"], True))
    rows += [
        row("Test accuracy after last epoch", lambda m: percent(m["final_test_accuracy"])),
        row("Training time, all epochs (s)", lambda m: number(m["train_seconds"]), ratios["train_seconds"], True),
        row("Seconds per epoch", lambda m: number(m["seconds_per_epoch"], ".2f"), ratios["seconds_per_epoch"], True),
        row("Peak RSS growth while training (MiB)", lambda m: number(m["memory"]["peak_rss_growth_training_mib"], ".0f"),
            ratios["peak_rss_growth_training"], True),
        row("Peak RSS of the process (MiB)", lambda m: number(m["memory"]["peak_rss_training_mib"], ".0f")),
    ]
    for size, value in ratios["inference_images_per_s"].items():
        rows.append(row(f"Inference, batch {size} (images/s)",
                        lambda m, s=size: number(m["inference"][s]["images_per_s"], ",.0f"), value, True))
    if "inference_predict_batch_1" in reference:
        rows.append(row("`model.predict`, batch 1 (images/s)",
                        lambda m: number(m["inference_predict_batch_1"]["images_per_s"], ",.0f")))
        for size in ratios["inference_images_per_s"]:
            rows.append(row(f"Served path (ONNX Runtime), batch {size} (images/s)",
                            lambda m, s=size: number(m["inference_served"][s]["images_per_s"], ",.0f")))
        rows.append(["Served batch 1 / reference `model.predict` batch 1", "", "",
                     times(ratios["served_batch_1_over_reference_predict"])])
    settings = record["settings"]
    lines = [
        table(["", model_label(reference), model_label(default), "default / reference"], rows),
        "",
        f"Trained on {settings['train_images']:,} images, scored on {settings['test_images']:,} test images after every "
        f"epoch (scoring time excluded); each model in its own process. {machine_line(record['machine'])}.",
    ]
    return "\n".join(lines)


def pruning_markdown(record: dict) -> str:
    pruned, unpruned, saved = record["arms"]["pruned"], record["arms"]["unpruned"], record["saving"]
    settings = record["settings"]
    difference = saved["best_val_accuracy_difference"]
    rows = [
        ["Trials (complete / pruned)", f"{pruned['complete']} / {pruned['pruned']}",
         f"{unpruned['complete']} / {unpruned['pruned']}", ""],
        ["Trial-epochs trained", str(pruned["trial_epochs"]), str(unpruned["trial_epochs"]), times(saved["trial_epochs_ratio"])],
        ["Wall time (s)", number(pruned["wall_seconds"]), number(unpruned["wall_seconds"]), times(saved["wall_seconds_ratio"])],
        ["Best val accuracy", percent(pruned["best_val_accuracy"]), percent(unpruned["best_val_accuracy"]),
         MISSING if difference is None else f"{100 * difference:+.2f} pp"],
    ]
    return "\n".join([
        table(["", f"pruner `{pruned['pruner']}`", "no pruner", "pruned / unpruned"], rows),
        "",
        f"The same study twice: {settings['n_trials']} trials of up to {settings['epochs']} epochs on "
        f"{settings['train_images']:,} training and {settings['val_images']:,} validation images, TPE seeded with "
        f"{settings['seed']}. Pruning saved {percent(saved['trial_epochs_saved_fraction'])} of trial-epochs. "
        f"{machine_line(record['machine'])}.",
    ])


def sprint_markdown(record: dict) -> str:
    runs, medians = record["runs"], record["median_seconds_to_target"]
    target = f"{100 * record['settings']['target_test_accuracy']:.1f} %"

    def cell(row: dict) -> str:
        if row["seconds_to_target"] is None:
            return f"not reached ({percent(max(row['test_accuracy_by_epoch']))} in {row['epochs_trained']} epochs)"
        return f"{row['seconds_to_target']:.1f} s ({row['epochs_to_target']} epochs)"

    rows = [[str(reference["seed"]), cell(reference), cell(sprint)]
            for reference, sprint in zip(runs["reference"], runs["sprint"])]
    rows.append(["median", number(medians["reference"], suffix=" s"), number(medians["sprint"], suffix=" s")])
    reaching, settings = record["seeds_reaching_target"], record["settings"]
    return "\n".join([
        table(["seed", f"reference: time to {target}", f"`sprint`: time to {target}"], rows),
        "",
        f"Median sprint / reference: **{times(record['ratios_sprint_over_reference']['time_to_99_0'])}**; seeds reaching "
        f"{target}: reference {reaching['reference']}, sprint {reaching['sprint']} of {len(settings['seeds'])} (at most "
        f"{settings['max_epochs']['reference']} and {settings['max_epochs']['sprint']} epochs). Training seconds on "
        f"{settings['train_images']:,} images, test split scored after every epoch (not timed); each run in its own "
        f"process. {machine_line(record['machine'])}.",
    ])


def accuracy_markdown(record: dict) -> str:
    settings, ensemble = record["settings"], record["ensemble"]

    def minutes(seconds: float) -> str:
        return f"{seconds / 60:.1f} min"

    rows = [[str(row["seed"]), percent(row["test_accuracy"]), str(row["test_errors"]),
             percent(row["handwriting_accuracy"]), f"{row['best_epoch']} of {row['epochs_run']}",
             minutes(row["train_seconds"])] for row in record["seeds"]]
    spread = record["stdev_test_accuracy"]
    rows.append(["mean", percent(record["mean_test_accuracy"]) + (f" ± {100 * spread:.2f}" if spread else ""), "",
                 percent(record["mean_handwriting_accuracy"]), "", minutes(record["mean_train_seconds"])])
    if ensemble:
        rows.append([f"ensemble of the {ensemble['members']}", percent(ensemble["test_accuracy"]),
                     str(ensemble["test_errors"]), percent(ensemble["handwriting_accuracy"]), "", ""])
    return "\n".join([
        table(["seed", "test accuracy", "errors", "handwriting", "best epoch (validation)", "training"], rows),
        "",
        f"`{settings['preset']}` for up to {settings['epochs']} epochs (patience {settings['patience']}), "
        f"{settings['dtype_policy']}, on {settings['train_images']:,} training images; weights of the best "
        f"validation epoch ({settings['val_images']:,} images), test split ({settings['test_images']:,}) and the "
        f"handwriting set scored once afterwards; the ensemble is the one model averaging the seeds' "
        f"probabilities (what `train.members` saves). {machine_line(record['machine'])}.",
    ])


# results.json, the train benchmark's record, also carries the latest sprint's summary under this key
SPRINT_SECTION = "sprint"


def sprint_section(record: dict) -> dict:
    """What results.json keeps of a sprint record (the whole record is sprint.json)."""
    return {"command": record["command"], "date": record["machine"]["date"], "seeds": record["settings"]["seeds"],
            "median_seconds_to_99_0": record["median_seconds_to_target"],
            "seeds_reaching_99_0": record["seeds_reaching_target"],
            "time_to_99_0": record["ratios_sprint_over_reference"]["time_to_99_0"], "record": "sprint.json"}


def read_record(path: Path) -> dict:
    """A JSON record written earlier, or {} when there is none (or it is not a JSON object)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def carry_sprint_section(out_dir: Path, stem: str, record: dict) -> dict:
    """The record to write as `<stem>.json`: a sprint's summary goes into results.json as well (returned
    unchanged here, written by `write_sprint_section`); a new results.json keeps the previous one's."""
    if stem != "results":
        return record
    previous = read_record(out_dir / "results.json").get(SPRINT_SECTION)
    return record if previous is None else {**record, SPRINT_SECTION: previous}


def write_sprint_section(out_dir: Path, record: dict) -> Path:
    path = out_dir / "results.json"
    write_atomically(path, json.dumps({**read_record(path), SPRINT_SECTION: sprint_section(record)}, indent=2) + "\n")
    return path
