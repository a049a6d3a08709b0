"""The drift report's renderings: the terminal table and the offline HTML page."""

from __future__ import annotations

import base64
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from pipeline.monitoring.drift import compare
from pipeline.monitoring.report import render_html, summary, terminal_table
# the synthetic strokes and answers the drift tests use (one generator for both files)
from tests.code.test_drift import REFERENCE_ROWS, answers, draw_strokes, thicker, window

FIGURES = 3  # feature histograms, class mix, confidence
IMAGE = '<img src="data:image/png;base64,'
CONTEXT = {"model": "mnist-cnn", "version": "7", "window": "last 300 answers", "time": "2025-01-01 12:00 UTC"}


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(7)
    return answers(rng, draw_strokes(rng, REFERENCE_ROWS // 2), feedback_share=1.0)


@pytest.fixture(scope="module")
def drifted():
    flooded = np.full(10, 0.3 / 9)
    flooded[1] = 0.7
    return window(21, change=thicker, class_shares=flooded)


@pytest.fixture(scope="module")
def drift_report(reference, drifted):
    return compare(reference, drifted)


def test_the_table_names_each_failed_check(drift_report):
    table = terminal_table(drift_report)
    failed = [check.name for check in drift_report.failed]
    assert {"feature:ink_fraction", "class_mix"} <= set(failed)
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert all(rows[name].split("  ")[0] == name and " FAIL " in rows[name] for name in failed)
    assert table.splitlines()[-1] == "drift: " + ", ".join(failed)


def test_the_table_has_one_row_per_check_and_aligned_columns(drift_report):
    lines = terminal_table(drift_report).splitlines()
    assert lines[0].split() == ["check", "test", "reference", "window", "p-value", "result", "detail"]
    body = lines[1:1 + len(drift_report.checks)]
    assert [line.split()[0] for line in body] == [check.name for check in drift_report.checks]
    result_column = lines[0].index("result")
    assert all(line[result_column:result_column + 4] in ("PASS", "FAIL", "skip") for line in body)
    assert lines[1 + len(drift_report.checks)] == ""


def test_the_summary_reads_as_a_sentence(reference):
    assert summary(compare(reference, window(22))) == "no drift in 300 rows"
    unlabelled = compare(reference, window(23, feedback_share=None, n=1000))
    assert summary(unlabelled) == "no drift in 1,000 rows; skipped: feedback_accuracy"
    too_few = compare(reference, window(24, n=57, change=thicker))
    assert summary(too_few) == "too few rows (57 < 200): no verdict"
    assert "FAIL" not in terminal_table(too_few) and terminal_table(too_few).count(" skip ") == len(too_few.checks)


@pytest.fixture(scope="module")
def page(reference, drifted, drift_report):
    return render_html(drift_report, reference, drifted, {**CONTEXT, "note": "<script>alert('x')</script> & co"})


def test_the_page_works_offline(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for reference in ("http://", "https://", 'src="http', "<link", "@import", "url("):
        assert reference not in page


def test_the_page_holds_one_inline_png_per_figure(page):
    assert page.count(IMAGE) == FIGURES
    assert page.count("<img") == FIGURES
    for encoded in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")


def test_the_page_escapes_what_it_is_given(page):
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page


def test_the_page_shows_the_context_the_verdict_and_the_failed_checks(page, drift_report):
    for value in CONTEXT.values():
        assert value in page
    assert "Drift found" in page
    assert page.count('<tr class="fail">') == len(drift_report.failed)
    assert "failed: ink_fraction" in page  # the feature figure's caption names the highlighted features


def test_rendering_closes_its_figures_and_handles_thin_data(reference):
    plt.close("all")
    bare = window(25, n=40, feedback_share=None, verdict=False)
    page = render_html(compare(reference, bare), reference, bare, {})
    assert page.count(IMAGE) == FIGURES and "No verdict" in page
    assert plt.get_fignums() == []
