"""The site validation report as HTML: a whole self-contained document (``report.html``) and the
same content as a fragment for the admin page.

Pure functions of the report dict that ``report`` computes.  The output never refers to
anything outside itself (no scripts, stylesheets, fonts or remote images): the plots are PNGs
embedded as ``data:`` URIs, so the file opens on an air-gapped workstation.  Every string
taken from the report is escaped, since a model or finding name may contain markup.

matplotlib is imported inside the plotting functions only: the web app imports this module
and its start-up time is tested, so importing it must not pull matplotlib in.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from dicom_node.validation.style import PAGE_CSS, REPORT_CSS

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DASH = "—"
DISCLAIMER = "For decision support only — AI-generated."
SHADOW_SENTENCE = (
    "Shadow model: its results are stored for validation only; "
    "nothing is delivered to PACS or shown to radiologists."
)
IOBB_LEVELS = ("0.1", "0.25", "0.5")
SHA_SHOWN = 12
FIG_SIZE_IN = (4.0, 3.0)
FIG_DPI = 80
# Fixed margins: tight_layout would draw every figure twice.
PLOT_MARGINS = {"left": 0.17, "right": 0.97, "bottom": 0.16, "top": 0.92}
# Labelled major ticks and unlabelled minor ones: each label is a costly text layout.
UNIT_TICKS = (0.0, 0.5, 1.0)
UNIT_MINOR_TICKS = (0.25, 0.75)


# ----------------------------------------------------------------------------- formatting


def _esc(value: Any) -> str:
    """``value`` as escaped text (quotes too, so it is safe in attributes); None as a dash."""
    return DASH if value is None else html.escape(str(value), quote=True)


def _is_number(value: Any) -> TypeGuard[int | float]:
    """True for a finite int or float that is not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals; None, NaN or anything non-numeric as a dash."""
    return f"{value:.{digits}f}" if _is_number(value) else DASH


def fmt_count(value: Any) -> str:
    """A count as an integer; anything else as a dash."""
    return str(int(value)) if _is_number(value) else DASH


def _ci_text(ci: Any) -> str:
    """An interval ``[low, high]`` as ``[0.800, 0.950]``, or a dash when absent."""
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return DASH
    if not (_is_number(ci[0]) and _is_number(ci[1])):
        return DASH
    return f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]"


def _value_ci_cell(value: Any, ci: Any) -> str:
    """A table cell with a value and, under it, its interval."""
    ci_html = "" if _ci_text(ci) == DASH else f'<br><span class="vr-ci">{_ci_text(ci)}</span>'
    return f'<td class="vr-num">{fmt_number(value)}{ci_html}</td>'


def _num_cell(text: str) -> str:
    """A right-aligned table cell around already-safe text."""
    return f'<td class="vr-num">{text}</td>'


# ----------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class PlotCanvas:
    """One [0, 1] x [0, 1] axes whose static parts (frame, ticks, labels, grid) were drawn
    once, ``background`` being that raster, and ``diagonal`` a dashed line each plot draws.
    Each plot restores the background and draws only its own artists (matplotlib blitting):
    text layout dominates drawing, and redrawing the same tick labels for every finding
    would take about three times as long for a many-finding report."""

    fig: Figure
    ax: Axes
    background: Any
    diagonal: Artist


def plot_canvas(xlabel: str, ylabel: str, diagonal: str) -> PlotCanvas:
    """A canvas on the Agg backend (a bare Figure, not registered with pyplot, so there is no
    global figure state to close) with the dashed diagonal labelled ``diagonal``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    agg = FigureCanvasAgg(fig)
    fig.subplots_adjust(**PLOT_MARGINS)
    ax = fig.add_subplot()
    ax.set(xlim=(0, 1), ylim=(0, 1.04), xlabel=xlabel, ylabel=ylabel)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(UNIT_TICKS, labels=[f"{t:g}" for t in UNIT_TICKS])
        axis.set_ticks(UNIT_MINOR_TICKS, minor=True)
    ax.grid(True, which="both", color="#e5e5e5", linewidth=0.5)
    (line,) = ax.plot([0, 1], [0, 1], "--", color="#999999", linewidth=1, label=diagonal)
    line.set_visible(False)  # drawn by each plot, over its bars and curves
    agg.draw()
    background = agg.copy_from_bbox(fig.bbox)
    line.set_visible(True)
    return PlotCanvas(fig, ax, background, line)


def plot_png_data_uri(canvas: PlotCanvas, artists: Sequence[Artist]) -> str:
    """Draw ``artists`` (already added to ``canvas.ax``; they may include ``canvas.diagonal``)
    in order over the canvas background, return the image as a ``data:image/png;base64,`` URI,
    and remove the artists (bar the diagonal) so the canvas is clean for the next plot."""
    import numpy as np
    from PIL import Image

    agg = canvas.fig.canvas
    try:
        agg.restore_region(canvas.background)  # type: ignore[attr-defined]
        for artist in artists:
            canvas.ax.draw_artist(artist)
        rgba = np.asarray(agg.buffer_rgba())  # type: ignore[attr-defined]
        buffer = io.BytesIO()
        Image.fromarray(rgba[..., :3]).save(buffer, format="png")
    finally:
        for artist in artists:
            if artist is not canvas.diagonal:
                artist.remove()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _point(finding: Mapping[str, Any]) -> tuple[float, float] | None:
    """(false-positive rate, sensitivity) of a dict with sensitivity and specificity."""
    sens, spec = finding.get("sensitivity"), finding.get("specificity")
    if _is_number(sens) and _is_number(spec):
        return 1.0 - float(spec), float(sens)
    return None


def roc_plot_uri(canvas: PlotCanvas, finding: Mapping[str, Any]) -> str | None:
    """The ROC curve with the diagonal, the operating point in force and the proposed point, on
    a canvas from ``plot_canvas``; None when the finding has no curve."""
    roc = finding.get("roc") or {}
    fpr, tpr = roc.get("fpr") or [], roc.get("tpr") or []
    if not fpr or len(fpr) != len(tpr):
        return None
    ax = canvas.ax
    artists: list[Artist] = []
    artists += ax.plot(fpr, tpr, color="#1f5fa8", linewidth=1.5, label="ROC")
    threshold, current = finding.get("threshold"), _point(finding)
    if _is_number(threshold) and current is not None:
        label = f"operating point (t={threshold:.2f})"
        artists += ax.plot(*current, "o", markersize=7, color="#b3261e", label=label)
    proposed = finding.get("proposed")
    proposed = proposed if isinstance(proposed, Mapping) else {}
    proposed_point = _point(proposed)
    if proposed_point is not None and _is_number(proposed.get("threshold")):
        label = f"proposed (t={proposed['threshold']:.2f})"
        artists += ax.plot(*proposed_point, "D", markersize=6, color="#2e7d32", label=label)
    artists.append(ax.legend(handles=[canvas.diagonal, *artists], loc="lower right", fontsize=7))
    artists.insert(1, canvas.diagonal)  # over the curve, under the markers
    return plot_png_data_uri(canvas, artists)


def _reliability_arrays(
    reliability: Any,
) -> tuple[list[float], list[int], list[float | None], list[float | None]] | None:
    """The reliability bins as lists, or None when malformed (lengths disagree)."""
    if not isinstance(reliability, Mapping):
        return None
    edges = list(reliability.get("bin_edges") or [])
    counts = list(reliability.get("counts") or [])
    mean_pred = list(reliability.get("mean_predicted") or [])
    frac_pos = list(reliability.get("fraction_positive") or [])
    n_bins = len(counts)
    if n_bins == 0 or len(edges) != n_bins + 1 or not len(mean_pred) == len(frac_pos) == n_bins:
        return None
    return edges, counts, mean_pred, frac_pos


def reliability_plot_uri(canvas: PlotCanvas, finding: Mapping[str, Any]) -> str | None:
    """The reliability diagram: per bin a bar of the fraction positive and a point at (mean
    predicted, fraction positive), the diagonal, and each bin's case count above its bar; None
    when the finding has no reliability bins.  ``canvas`` comes from ``plot_canvas``."""
    arrays = _reliability_arrays(finding.get("reliability"))
    if arrays is None:
        return None
    edges, counts, mean_pred, frac_pos = arrays
    ax = canvas.ax
    heights = [f if _is_number(f) else 0.0 for f in frac_pos]
    bars = ax.stairs(heights, edges, fill=True, color="#9ec5ea", label="fraction positive")
    artists: list[Artist] = [bars]
    points = [(m, f) for m, f in zip(mean_pred, frac_pos, strict=True) if _is_number(m)]
    points = [(m, f) for m, f in points if _is_number(f)]
    if points:
        xs, ys = zip(*points, strict=True)
        artists += ax.plot(xs, ys, "o", markersize=3, color="#1b1f24", label="bin means")
    artists.append(ax.legend(handles=[canvas.diagonal, *artists], loc="upper left", fontsize=7))
    artists.insert(1, canvas.diagonal)  # over the bars, under the points
    # The bin counts in a row above the axes (x in data, y in axes coordinates).
    above = ax.get_xaxis_transform()
    artists.append(ax.text(0.0, 1.02, "n", fontsize=6, ha="right", va="bottom", transform=above))
    for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if _is_number(count) and count > 0:
            artists.append(ax.text((low + high) / 2, 1.02, fmt_count(count), fontsize=6,
                                   ha="center", va="bottom", transform=above))  # fmt: skip
    return plot_png_data_uri(canvas, artists)


# ----------------------------------------------------------------------------- sections


def _header(report: Mapping[str, Any]) -> str:
    """Model identity, the SHADOW badge and warning, the disclaimer and the report's scope."""
    model = report.get("model") or {}
    sha = model.get("weights_sha256")
    sha_html = f'<code title="{_esc(sha)}">{_esc(str(sha)[:SHA_SHOWN])}</code>' if sha else DASH
    shadow = model.get("mode") == "shadow"
    badge = ' <span class="vr-badge">SHADOW</span>' if shadow else ""
    warn = f'<p class="vr-warn">{html.escape(SHADOW_SENTENCE)}</p>' if shadow else ""
    period = report.get("period") or {}
    since, until = period.get("since"), period.get("until")
    period_text = (
        "all results"
        if since is None and until is None
        else f"{_esc(since or 'beginning')} to {_esc(until or 'now')}"
    )
    settings = report.get("settings") or {}
    rows = [
        ("Model", f"{_esc(model.get('name'))} {_esc(model.get('version'))}"),
        ("Weights SHA-256", sha_html),
        ("Mode", _esc(model.get("mode"))),
        ("Period", period_text),
        ("Studies", fmt_count(report.get("studies"))),
        ("Generated at", _esc(report.get("generated_at"))),
        ("Thresholds", _esc(report.get("thresholds_version"))),
        ("Target sensitivity", fmt_number(settings.get("target_sensitivity"))),
        ("Threshold rule", _esc(settings.get("rule"))),
        ("Bootstrap resamples", fmt_count(settings.get("bootstrap_resamples"))),
        ("ECE bins", fmt_count(settings.get("ece_bins"))),
    ]
    meta = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f"<h1>Validation report: {_esc(model.get('name'))}{badge}</h1>{warn}"
        f'<p class="vr-disclaimer">{html.escape(DISCLAIMER)}</p>'
        f'<table class="vr-meta">{meta}</table>'
    )


SUMMARY_COLUMNS = (
    "Finding", "Positives", "Negatives", "AUROC [95% CI DeLong]", "Bootstrap CI",
    "Sensitivity", "Specificity", "PPV", "NPV", "ECE",
    "IoBB hit @0.1", "IoBB hit @0.25", "IoBB hit @0.5", "Boxes",
    "Threshold in force", "Proposed threshold (spec, sens 95% lower bound)",
)  # fmt: skip


def _proposed_cell(proposed: Any) -> str:
    """The proposed threshold with its specificity and sensitivity lower bound."""
    if not isinstance(proposed, Mapping) or not _is_number(proposed.get("threshold")):
        return _num_cell(DASH)
    return _num_cell(
        f'{fmt_number(proposed["threshold"])}<br><span class="vr-ci">'
        f"spec {fmt_number(proposed.get('specificity'))}, "
        f"sens ≥ {fmt_number(proposed.get('sensitivity_ci_low'))}"
        f" ({_esc(proposed.get('rule'))})</span>"
    )


def _summary_row(name: str, finding: Mapping[str, Any]) -> str:
    """One table row; a finding whose status is not "ok" shows its counts and status only."""
    head = (
        f"<th>{_esc(name)}</th>{_num_cell(fmt_count(finding.get('n_pos')))}"
        f"{_num_cell(fmt_count(finding.get('n_neg')))}"
    )
    if finding.get("status") != "ok":
        span = len(SUMMARY_COLUMNS) - 3
        status = _esc(finding.get("status"))
        return f'<tr>{head}<td colspan="{span}" class="vr-status">{status}</td></tr>'
    hits = finding.get("iobb_hit_rate")
    hits = hits if isinstance(hits, Mapping) else {}
    cells = [
        _value_ci_cell(finding.get("auroc"), finding.get("auroc_ci")),
        _num_cell(_ci_text(finding.get("auroc_ci_bootstrap"))),
        *(
            _value_ci_cell(finding.get(k), finding.get(f"{k}_ci"))
            for k in ("sensitivity", "specificity", "ppv", "npv")
        ),
        _num_cell(fmt_number(finding.get("ece"))),
        *(_num_cell(fmt_number(hits.get(level))) for level in IOBB_LEVELS),
        _num_cell(fmt_count(finding.get("n_boxes"))),
        _num_cell(fmt_number(finding.get("threshold"))),
        _proposed_cell(finding.get("proposed")),
    ]
    return f"<tr>{head}{''.join(cells)}</tr>"


def _summary(findings: Mapping[str, Mapping[str, Any]]) -> str:
    """The summary table, one row per finding in the report's order."""
    header = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
    rows = "".join(_summary_row(name, f) for name, f in findings.items())
    return (
        '<h2>Summary</h2><div class="vr-scroll"><table class="vr-summary">'
        f"<thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _figure(uri: str | None, alt: str, caption: str) -> str:
    """An embedded plot with its caption, or a note when there is nothing to plot."""
    if uri is None:
        return f'<p class="vr-status">{alt}: no data</p>'
    return (
        f'<figure><img src="{uri}" alt="{alt}" width="{int(FIG_SIZE_IN[0] * FIG_DPI)}" '
        f'height="{int(FIG_SIZE_IN[1] * FIG_DPI)}"><figcaption>{caption}</figcaption></figure>'
    )


def _finding_plots(
    name: str, finding: Mapping[str, Any], roc_canvas: PlotCanvas, rel_canvas: PlotCanvas
) -> str:
    """The ROC curve and the reliability diagram of one finding."""
    safe = _esc(name)
    counts = (finding.get("reliability") or {}).get("counts") or []
    roc_caption = (
        f"AUROC {fmt_number(finding.get('auroc'))} {_ci_text(finding.get('auroc_ci'))}; "
        f"{fmt_count(finding.get('n_pos'))} positive, {fmt_count(finding.get('n_neg'))} negative."
    )
    rel_caption = (
        f"ECE {fmt_number(finding.get('ece'))}. Cases per bin: "
        + ", ".join(fmt_count(c) for c in counts)
        + "."
    )
    roc = _figure(roc_plot_uri(roc_canvas, finding), f"ROC curve for {safe}", roc_caption)
    rel_uri = reliability_plot_uri(rel_canvas, finding)
    rel = _figure(rel_uri, f"Reliability diagram for {safe}", rel_caption)
    return (
        f'<section class="vr-finding"><h3>{safe}</h3>'
        f'<div class="vr-plots">{roc}{rel}</div></section>'
    )


def _body(report: Mapping[str, Any]) -> str:
    """The report's content: header, summary table, and plots for every finding with status ok."""
    findings = report.get("findings") or {}
    computed = {name: f for name, f in findings.items() if f.get("status") == "ok"}
    plots_html = ""
    if computed:  # the canvases are shared by all findings of this report, and only by them
        roc_canvas = plot_canvas("1 − specificity", "sensitivity", "chance")
        rel_canvas = plot_canvas("mean predicted probability", "fraction positive", "perfect")
        plots = "".join(
            _finding_plots(name, f, roc_canvas, rel_canvas) for name, f in computed.items()
        )
        plots_html = f"<h2>Per finding</h2>{plots}"
    return f"{_header(report)}{_summary(findings)}{plots_html}"


def render_report_section(report: Mapping[str, Any], inline_style: bool = True) -> str:
    """The report as an HTML fragment for the admin page: a ``<section class="vr-report">``
    carrying its own scoped ``<style>`` (or none, where a Content-Security-Policy refuses
    inline styles and the page links :data:`REPORT_CSS` instead), with no ``<html>``,
    ``<head>`` or ``<body>``."""
    style = f"<style>{REPORT_CSS}</style>" if inline_style else ""
    return f'<section class="vr-report">{style}{_body(report)}</section>'


def render_report_html(report: Mapping[str, Any]) -> str:
    """The report as a whole self-contained HTML5 document, its title naming the model."""
    name = _esc((report.get("model") or {}).get("name"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Validation report: {name}</title><style>{PAGE_CSS}{REPORT_CSS}</style></head>"
        f'<body><main class="vr-report">{_body(report)}</main></body></html>\n'
    )
