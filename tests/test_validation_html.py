"""The validation report's HTML: self-contained (plots as embedded PNGs, nothing fetched),
escaped, the shadow warning only for shadow models, "too few cases" findings without metrics,
numbers to three decimals, and no matplotlib import when the module is imported."""

from __future__ import annotations

import base64
import copy
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from dicom_node.validation.html import render_report_html, render_report_section

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_BINS = 15


def _ok_finding(seed: int, n_pos: int = 60, n_neg: int = 140) -> dict[str, Any]:
    """A finding computed from synthetic scores: ROC points, reliability bins, rates."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    score = np.clip(np.r_[rng.normal(0.7, 0.15, n_pos), rng.normal(0.35, 0.15, n_neg)], 0, 1)
    fpr, tpr, _ = roc_curve(y, score)
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    which = np.clip(np.digitize(score, edges[1:-1]), 0, N_BINS - 1)
    counts = np.bincount(which, minlength=N_BINS)
    mean_pred = [float(score[which == b].mean()) if counts[b] else None for b in range(N_BINS)]
    frac_pos = [float(y[which == b].mean()) if counts[b] else None for b in range(N_BINS)]
    pred = score >= 0.5
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = n_neg - fp, n_pos - tp
    return {
        "n_pos": n_pos, "n_neg": n_neg, "status": "ok",
        "auroc": 0.91234, "auroc_ci": [0.87, 0.95], "auroc_ci_bootstrap": [0.86, 0.95],
        "threshold": 0.5,
        "sensitivity": tp / n_pos, "sensitivity_ci": [0.8, 0.95],
        "specificity": tn / n_neg, "specificity_ci": [0.85, 0.97],
        "ppv": tp / (tp + fp), "ppv_ci": [0.7, 0.9], "npv": None, "npv_ci": None,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "ece": 0.04, "reliability": {
            "bin_edges": edges.tolist(), "counts": counts.tolist(),
            "mean_predicted": mean_pred, "fraction_positive": frac_pos,
        },
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "iobb_hit_rate": {"0.1": 0.8, "0.25": 0.6, "0.5": 0.3}, "n_boxes": 20,
        "proposed": {"rule": "sensitivity", "threshold": 0.31, "sensitivity": 0.95,
                     "specificity": 0.7, "sensitivity_ci_low": 0.86},
    }  # fmt: skip


def _report(mode: str = "shadow", n_ok: int = 1, name: str = "densenet121-res224-all") -> dict:
    """A report with ``n_ok`` computed findings and one with too few cases ("Nodule")."""
    findings: dict[str, Any] = {
        ("Effusion" if i == 0 else f"Finding {i}"): _ok_finding(i) for i in range(n_ok)
    }
    findings["Nodule"] = {"n_pos": 3, "n_neg": 197, "status": "too few cases"}
    return {
        "model": {"name": name, "version": "1.5.7", "weights_sha256": "ab12cd34ef56" + "7" * 52,
                  "mode": mode},
        "generated_at": "2026-12-03T16:00:00+00:00",
        "period": {"since": None, "until": None},
        "studies": 200,
        "thresholds_version": "site-v2 (report 1a2b3c4d)",
        "settings": {"target_sensitivity": 0.95, "rule": "sensitivity",
                     "bootstrap_resamples": 2000, "ece_bins": N_BINS},
        "findings": findings,
    }  # fmt: skip


class _Images(HTMLParser):
    """Collects the src of every <img> and every tag name seen."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def _parse(document: str) -> _Images:
    parser = _Images()
    parser.feed(document)
    return parser


@pytest.fixture(scope="module")
def big() -> tuple[str, float]:
    """18 computed findings (plus one with too few cases) rendered once (its speed is
    bench/validate.py's)."""
    return render_report_html(_report(n_ok=18)), 0.0


def test_document_is_self_contained_with_embedded_png_plots(big: tuple[str, float]) -> None:
    document, _ = big
    for forbidden in ("http://", "https://", 'src="//', "<script", "<link", "url(", "@import"):
        assert forbidden not in document.lower(), forbidden
    srcs = _parse(document).srcs
    assert len(srcs) == 2 * 18  # a ROC curve and a reliability diagram per computed finding
    for src in srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_SIGNATURE)


def test_document_is_html5_with_charset_and_title_naming_the_model() -> None:
    document = render_report_html(_report())
    assert document.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in document
    title = re.search(r"<title>(.*?)</title>", document, re.S)
    assert title is not None and "densenet121-res224-all" in title.group(1)
    assert "For decision support only — AI-generated." in document


def test_too_few_cases_finding_shows_counts_and_status_but_no_auroc() -> None:
    report = _report()
    # Even stray metric values on such a finding must not be shown.
    report["findings"]["Nodule"]["auroc"] = 0.777
    document = render_report_html(report)
    row = re.search(r"<tr><th>Nodule</th>(.*?)</tr>", document, re.S)
    assert row is not None
    assert ">3<" in row.group(1) and ">197<" in row.group(1)
    assert "too few cases" in row.group(1)
    assert not re.search(r"\d\.\d{3}", row.group(1))
    assert "0.777" not in document
    assert "ROC curve for Nodule" not in document
    assert "ROC curve for Effusion" in document


def test_shadow_report_shows_badge_and_sentence_and_live_does_not() -> None:
    sentence = "Shadow model: its results are stored for validation only; nothing is delivered"
    shadow = render_report_html(_report(mode="shadow"))
    assert ">SHADOW<" in shadow and sentence in shadow
    live = render_report_html(_report(mode="live"))
    assert "shadow" not in live.lower()
    assert "live" in live


def test_hostile_strings_from_the_report_are_escaped() -> None:
    hostile = '<img src=x onerror="alert(1)">&'
    report = _report(name=hostile)
    report["findings"]["<b>Effusion</b>"] = report["findings"].pop("Effusion")
    report["thresholds_version"] = '"><script>alert(2)</script>'
    report["model"]["weights_sha256"] = '"onmouseover="alert(3)'
    for document in (render_report_html(report), render_report_section(report)):
        assert "<script" not in document and "<b>Effusion" not in document
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in document
        assert "&lt;b&gt;Effusion&lt;/b&gt;" in document
        assert 'title="&quot;onmouseover=&quot;alert(3)"' in document
        assert all(src.startswith("data:image/png;base64,") for src in _parse(document).srcs)


def test_section_is_a_fragment_with_prefixed_classes() -> None:
    section = render_report_section(_report())
    tags = _parse(section).tags
    assert not tags & {"html", "head", "body", "title", "meta"}
    assert section.startswith('<section class="vr-report">')
    classes = {c for attr in re.findall(r'class="([^"]*)"', section) for c in attr.split()}
    assert classes and all(c.startswith("vr-") for c in classes)
    selectors = re.findall(r"\.([a-zA-Z][\w-]*)", section.split("</style>")[0])
    assert selectors and all(s.startswith("vr-") for s in selectors)
    assert "SHADOW" in section and "ROC curve for Effusion" in section


def test_values_are_formatted_to_three_decimals_and_none_as_dash() -> None:
    document = render_report_html(_report())
    assert "0.912" in document and "0.91234" not in document
    assert "[0.870, 0.950]" in document and "[0.860, 0.950]" in document
    assert "0.310" in document and "0.700" in document and "0.860" in document
    assert "0.800" in document and "0.600" in document and "0.300" in document
    row = re.search(r"<tr><th>Effusion</th>(.*?)</tr>", document, re.S)
    assert row is not None and "—" in row.group(1)  # the NPV is None
    assert "ab12cd34ef56<" in document and 'title="ab12cd34ef56' + "7" * 52 + '"' in document


def test_missing_operating_point_and_plot_data_do_not_break_rendering() -> None:
    report = _report()
    finding = report["findings"]["Effusion"]
    finding.update(threshold=None, proposed=None, roc=None, reliability=None, iobb_hit_rate=None)
    document = render_report_html(report)
    assert _parse(document).srcs == []
    assert "ROC curve for Effusion: no data" in document
    baseline = render_report_html(_report())
    assert len(_parse(baseline).srcs) == 2 and baseline != document


def test_operating_point_changes_the_roc_plot() -> None:
    report = _report()
    moved = copy.deepcopy(report)
    moved["findings"]["Effusion"]["threshold"] = 0.7
    before, after = _parse(render_report_html(report)).srcs, _parse(render_report_html(moved)).srcs
    assert before[0] != after[0]  # the ROC plot carries the marker and its legend
    assert before[1] == after[1]  # the reliability diagram does not depend on it


def test_plots_of_a_finding_do_not_depend_on_the_findings_drawn_before_it() -> None:
    # The canvases are shared by the findings of one report: nothing may carry over.
    two = _report(n_ok=2)
    alone = copy.deepcopy(two)
    del alone["findings"]["Effusion"]
    srcs_two, srcs_alone = (
        _parse(render_report_html(two)).srcs,
        _parse(render_report_html(alone)).srcs,
    )
    assert len(srcs_two) == 4 and len(srcs_alone) == 2
    assert srcs_two[2:] == srcs_alone
    assert srcs_two[:2] != srcs_alone


def test_importing_the_module_does_not_import_matplotlib() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import dicom_node.validation.html"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
    )
    assert "dicom_node.validation.html" in result.stderr
    assert "matplotlib" not in result.stderr
