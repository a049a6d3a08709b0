"""The drift report for people: a plain-text table for the terminal, and one self-contained HTML page
(inline CSS and base64 PNG figures, nothing fetched) for monitoring/drift.html.

Pure rendering: a DriftReport and its two samples in, a string out; the caller writes it.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.core import plots
from pipeline.core.data import NUM_CLASSES
from pipeline.monitoring.drift import FEATURE_PREFIX, Check, DriftReport, Sample, format_p_value
from pipeline.monitoring.features import FEATURES

TABLE_COLUMNS = ("check", "test", "reference", "window", "p-value", "result", "detail")
NUMERIC_COLUMNS = {2, 3, 4}  # right-aligned: reference, window, p-value
REFERENCE_COLOUR, WINDOW_COLOUR, FAILED_COLOUR = "tab:blue", "tab:orange", "tab:red"
FIGURE_DPI = 80


def result_word(check: Check) -> str:
    return {True: "PASS", False: "FAIL", None: "skip"}[check.passed]


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table_rows(report: DriftReport) -> list[tuple[str, ...]]:
    """One row of text cells per check, in TABLE_COLUMNS order."""
    return [(check.name, check.test, format_number(check.reference), format_number(check.window),
             format_p_value(check.p_value), result_word(check), check.detail) for check in report.checks]


def summary(report: DriftReport) -> str:
    """One line: which checks failed, or that none did, or why there is no verdict."""
    if report.status == "too_few":
        return f"too few rows ({report.n_window:,} < {report.settings.min_window:,}): no verdict"
    if report.failed:
        return "drift: " + ", ".join(check.name for check in report.failed)
    skipped = [check.name for check in report.checks if check.passed is None]
    return f"no drift in {report.n_window:,} rows" + (f"; skipped: {', '.join(skipped)}" if skipped else "")


def terminal_table(report: DriftReport) -> str:
    """A fixed-width table, one row per check, then the summary line."""
    rows = [TABLE_COLUMNS, *table_rows(report)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS) - 1)]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(width) if column in NUMERIC_COLUMNS else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    return "\n".join([line(rows[0]), *(line(row) for row in rows[1:]), "", summary(report)])


def verdict_sentence(report: DriftReport) -> str:
    """The verdict in plain words, for the top of the page."""
    if report.status == "too_few":
        return (f"No verdict: the window has {report.n_window:,} rows, fewer than the "
                f"{report.settings.min_window:,} a verdict needs.")
    ran = len(report.ran)
    if report.failed:
        names = ", ".join(check.name for check in report.failed)
        return (f"Drift found: {len(report.failed)} of {ran} checks failed ({names}); the window no longer "
                f"looks like the reference.")
    return f"No drift: all {ran} checks that ran passed on {report.n_window:,} rows."


# --- figures -------------------------------------------------------------------------------------


def figure_data_uri(figure: Figure) -> str:
    """The figure as a base64 PNG data URI; the figure is closed."""
    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    finally:
        plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def shared_bins(*samples: np.ndarray, count: int = 30) -> np.ndarray:
    """Bin edges both sides share: one bin per value for small whole numbers (a box edge), else `count`."""
    values = np.concatenate(samples)
    low, high = values.min(), values.max()
    if np.all(values == np.round(values)) and high - low <= 40:
        return np.arange(low - 0.5, high + 1.5)
    return np.histogram_bin_edges(values, bins=count)


def overlaid_histogram(axis: Axes, before: np.ndarray, after: np.ndarray) -> None:
    """Densities of reference and window on shared bins (an empty window draws only the reference)."""
    bins = shared_bins(before, after)
    axis.hist(before, bins=bins, density=True, alpha=0.5, color=REFERENCE_COLOUR, label="reference")
    if len(after):
        axis.hist(after, bins=bins, density=True, alpha=0.5, color=WINDOW_COLOUR, label="window")


def mark_failed(axis: Axes) -> None:
    axis.set_facecolor("#fdecea")
    for spine in axis.spines.values():
        spine.set(color=FAILED_COLOUR, linewidth=2)


def feature_histograms(reference: Sample, window: Sample, failed: set[str]) -> Figure:
    """One overlaid density histogram per feature; failed ones framed in red."""
    figure, axes = plt.subplots(2, (len(FEATURES) + 1) // 2, figsize=(14, 6), constrained_layout=True)
    for column, (name, axis) in enumerate(zip(FEATURES, axes.flat)):
        overlaid_histogram(axis, reference.features[:, column], window.features[:, column])
        is_failed = f"{FEATURE_PREFIX}{name}" in failed
        axis.set_title(f"{name} (FAIL)" if is_failed else name, color=FAILED_COLOUR if is_failed else "black",
                       fontweight="bold" if is_failed else "normal")
        if is_failed:
            mark_failed(axis)
    axes.flat[0].legend()
    figure.suptitle("Input features: reference vs window (density)")
    return figure


def class_shares(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return counts / max(counts.sum(), 1)


def class_mix_bars(reference: Sample, window: Sample, failed: bool) -> Figure:
    """Each class's share of the predictions, reference and window side by side."""
    figure, axis = plt.subplots(figsize=(8, 3.5), constrained_layout=True)
    classes = np.arange(NUM_CLASSES)
    axis.bar(classes - 0.2, class_shares(reference.labels), width=0.4, color=REFERENCE_COLOUR, label="reference")
    axis.bar(classes + 0.2, class_shares(window.labels), width=0.4, color=WINDOW_COLOUR, label="window")
    axis.set(xticks=classes, xlabel="predicted class", ylabel="share of predictions",
             title="Class mix (FAIL)" if failed else "Class mix")
    if failed:
        mark_failed(axis)
    axis.legend()
    return figure


def confidence_histogram(reference: Sample, window: Sample, failed: bool) -> Figure:
    """Densities of the top probability, reference and window."""
    figure, axis = plt.subplots(figsize=(8, 3.5), constrained_layout=True)
    overlaid_histogram(axis, reference.confidence, window.confidence)
    axis.set(xlabel="confidence (top probability)", ylabel="density",
             title="Confidence (FAIL)" if failed else "Confidence")
    if failed:
        mark_failed(axis)
    axis.legend()
    return figure


def figures(report: DriftReport, reference: Sample, window: Sample) -> list[tuple[str, str]]:
    """(caption, PNG data URI) of each figure, drawn with the file backend and closed."""
    plots.use_file_backend()
    failed = {check.name for check in report.failed}
    failed_features = [name for name in FEATURES if f"{FEATURE_PREFIX}{name}" in failed]
    feature_caption = "Input features" + (f"; failed: {', '.join(failed_features)}" if failed_features else "")
    return [(feature_caption, figure_data_uri(feature_histograms(reference, window, failed))),
            ("Predicted-class mix", figure_data_uri(class_mix_bars(reference, window, "class_mix" in failed))),
            ("Confidence", figure_data_uri(confidence_histogram(reference, window, "confidence" in failed)))]


# --- the page ------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail { background: #fdecea; } tr.skip { color: #888; }
p.verdict { font-size: 1.2em; font-weight: bold; } p.drift { color: #b71c1c; } p.ok { color: #1b5e20; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
"""


def escaped(value: object) -> str:
    return html.escape(str(value), quote=True)


def context_table(context: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{escaped(key)}</th><td>{escaped(value)}</td></tr>" for key, value in context.items())
    return f'<table class="context">{rows}</table>'


def checks_table(report: DriftReport) -> str:
    header = "".join(f"<th>{escaped(name)}</th>" for name in TABLE_COLUMNS)
    body = []
    for check, cells in zip(report.checks, table_rows(report)):
        tds = "".join(f'<td class="number">{escaped(cell)}</td>' if column in NUMERIC_COLUMNS
                      else f"<td>{escaped(cell)}</td>" for column, cell in enumerate(cells))
        body.append(f'<tr class="{result_word(check).lower()}">{tds}</tr>')
    return f"<table class=\"checks\"><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure_html(caption: str, data_uri: str) -> str:
    return (f'<figure><img src="{data_uri}" alt="{escaped(caption)}">'
            f"<figcaption>{escaped(caption)}</figcaption></figure>")


def render_html(report: DriftReport, reference: Sample, window: Sample, context: dict[str, str]) -> str:
    """One offline HTML page: the context, the verdict in words, the checks, and the figures."""
    sizes = (f"reference {report.n_reference:,} rows; window {report.n_window:,} rows, "
             f"{report.n_feedback:,} with feedback")
    alpha = report.alpha_per_check
    level = (f"Each check fails only when p &lt; {escaped(f'{alpha:.2g}')} (alpha {escaped(report.settings.alpha)} "
             f"over {len(report.ran)} checks) and its effect reaches its threshold." if alpha else "")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>Drift report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>Drift report</h1>", context_table(context),
             f'<p class="verdict {escaped(report.status)}">{escaped(verdict_sentence(report))}</p>',
             f"<p>{escaped(sizes)}. {level}</p>", checks_table(report),
             *(figure_html(caption, uri) for caption, uri in figures(report, reference, window)),
             "</body></html>"]
    return "\n".join(parts)
