"""The finding labels each catalogue model reports, without importing torch.

``config`` needs them to check ``[thresholds]`` and ``[web] critical_findings`` at load (a
misspelled critical finding would silently never flag a study), and that must not cost a
torch import.  The table is the pinned torchxrayvision release's ``model_urls[...]["labels"]``
in output order ("" where a model was not trained on that output); a test compares it with the
installed package, so it cannot drift unnoticed when torchxrayvision is upgraded.
"""

from __future__ import annotations

import difflib

_ALL = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
        "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
        "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity",
        "Enlarged Cardiomediastinum")
_NIH = _ALL[:14] + ("", "", "", "")
_PC = _ALL[:14] + ("", "Fracture", "", "")
_CHEX = ("Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion",
         "Pneumonia", "", "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture", "Lung Opacity",
         "Enlarged Cardiomediastinum")
_RSNA = ("",) * 8 + ("Pneumonia",) + ("",) * 7 + ("Lung Opacity", "")

MODEL_LABELS: dict[str, tuple[str, ...]] = {
    "densenet121-res224-all": _ALL,
    "densenet121-res224-nih": _NIH,
    "densenet121-res224-pc": _PC,
    "densenet121-res224-chex": _CHEX,
    "densenet121-res224-rsna": _RSNA,
    "densenet121-res224-mimic_nb": _CHEX,
    "densenet121-res224-mimic_ch": _CHEX,
    "resnet50-res512-all": _ALL,
}


def reported_labels(model_name: str) -> tuple[str, ...]:
    """The findings ``model_name`` reports, sorted; empty for a name not in the catalogue."""
    return tuple(sorted(label for label in MODEL_LABELS.get(model_name, ()) if label))


def label_problems(model_name: str, thresholds: tuple[tuple[str, float], ...],
                   critical_findings: tuple[str, ...]) -> list[str]:
    """One config error line per unknown model name, or finding the model does not report.

    Finding names must match the model's labels exactly (case included): they are compared
    with the labels results carry, so a near miss would never match anything.
    """
    if model_name not in MODEL_LABELS:
        return [f"model.name = {model_name!r}: must be one of {', '.join(MODEL_LABELS)}"]
    labels = reported_labels(model_name)
    problems = []
    for label, _ in thresholds:
        if label not in labels:
            problems.append(f"thresholds.{label}: {model_name} reports no finding of that name"
                            f"{_suggestion(label, labels)}")
    for label in critical_findings:
        if label not in labels:
            problems.append(f"web.critical_findings: {label!r} is not a finding {model_name} "
                            f"reports, so no study would ever be flagged for it"
                            f"{_suggestion(label, labels)}")
    return problems


def _suggestion(label: str, labels: tuple[str, ...]) -> str:
    """`` (did you mean 'X'?)`` for the closest label, or the full list when none is close."""
    close = difflib.get_close_matches(label, labels, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(labels)})"
