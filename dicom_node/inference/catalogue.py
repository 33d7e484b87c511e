"""The built-in catalogue of TorchXRayVision models: names, labels, thresholds, release files.

Plain data, no torch: ``config``, the web pages and ``dicom-node models list`` read it without
loading the framework (the networks themselves are :mod:`dicom_node.inference.networks`).
The values are the pinned torchxrayvision release's ``xrv.models.model_urls`` (labels from
:data:`dicom_node.results.MODEL_LABELS`; ``op_threshs`` with NaN as None); a test compares
them with the installed package, so they cannot drift unnoticed when it is upgraded.  No
SHA-256 or file size is published for the release files: those fields stay ``None`` and the
registry records the hash of the first verified install (trust on first use).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from dicom_node.results import MODEL_LABELS

MODEL_NAMES = tuple(MODEL_LABELS)
DEFAULT_MODEL = "densenet121-res224-all"
RELEASE_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
NA: None = None  # no operating point: the model was not trained on that output

# name: (release file, input resolution, op_threshs in output order)
_RELEASES: dict[str, tuple[str, int, tuple[float | None, ...]]] = {
    "densenet121-res224-all": (
        "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-"
        "seed0-best.pt",
        224,
        (
            0.07422872,
            0.038290843,
            0.09814756,
            0.0098118475,
            0.023601074,
            0.0022490358,
            0.010060724,
            0.103246614,
            0.056810737,
            0.026791653,
            0.050318155,
            0.023985857,
            0.01939503,
            0.042889766,
            0.053369623,
            0.035975814,
            0.20204692,
            0.05015312,
        ),
    ),
    "densenet121-res224-nih": (
        "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (
            0.039117552,
            0.0034529066,
            0.11396341,
            0.0057298196,
            0.00045666535,
            0.0018880932,
            0.012037827,
            0.038744126,
            0.0037213727,
            0.014730946,
            0.016149804,
            0.054241467,
            0.037198864,
            0.0004403434,
            NA,
            NA,
            NA,
            NA,
        ),
    ),
    "densenet121-res224-pc": (
        "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (
            0.031012505,
            0.013347598,
            0.081435576,
            0.001262615,
            0.002587246,
            0.0035944257,
            0.0023071,
            0.055412333,
            0.044385884,
            0.042766232,
            0.043258056,
            0.037629247,
            0.005658899,
            0.0091741895,
            NA,
            0.026507627,
            NA,
            NA,
        ),
    ),
    "densenet121-res224-chex": (
        "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (
            0.1988969,
            0.05710573,
            NA,
            0.0531293,
            0.1435217,
            NA,
            NA,
            0.27212676,
            0.07749717,
            NA,
            0.19712369,
            NA,
            NA,
            NA,
            0.09932402,
            0.09273402,
            0.3270967,
            0.10888247,
        ),
    ),
    "densenet121-res224-rsna": (
        "kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (NA, NA, NA, NA, NA, NA, NA, NA, 0.13486601, NA, NA, NA, NA, NA, NA, NA, 0.13511065, NA),
    ),
    "densenet121-res224-mimic_nb": (
        "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (
            0.08558747,
            0.011884617,
            NA,
            0.0040595434,
            0.010733786,
            NA,
            NA,
            0.118761964,
            0.022924708,
            NA,
            0.06358637,
            NA,
            NA,
            NA,
            0.022143636,
            0.017476924,
            0.1258702,
            0.014020768,
        ),
    ),
    "densenet121-res224-mimic_ch": (
        "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        224,
        (
            0.09121389,
            0.010573786,
            NA,
            0.005023008,
            0.003698257,
            NA,
            NA,
            0.08001232,
            0.037242252,
            NA,
            0.05006329,
            NA,
            NA,
            NA,
            0.019866971,
            0.03823637,
            0.11303808,
            0.0069147074,
        ),
    ),
    "resnet50-res512-all": (
        "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
        512,
        (
            0.51570356,
            0.50444704,
            0.53787947,
            0.50723547,
            0.5025118,
            0.5035252,
            0.5038076,
            0.51862943,
            0.5078151,
            0.50724894,
            0.5056339,
            0.510706,
            0.5053923,
            0.5020846,
            NA,
            0.5080557,
            0.5138526,
            NA,
        ),
    ),
}


@dataclass(frozen=True)
class CatalogueEntry:
    """What the node knows about one released model before any file is installed."""

    name: str
    architecture: str  # "densenet121" or "resnet50"
    labels: tuple[str, ...]  # "" where the model was not trained on that output
    resolution: int
    op_thresholds: tuple[float | None, ...]
    url: str
    published_size: int | None = None
    published_sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def version(self) -> str:
        """The release the file belongs to (from its URL), with the torchxrayvision version."""
        release = self.url.split("/download/", 1)[-1].split("/", 1)[0]
        return f"xrv-{importlib.metadata.version('torchxrayvision')}/{release}"


def _entry(name: str) -> CatalogueEntry:
    file_name, resolution, thresholds = _RELEASES[name]
    return CatalogueEntry(
        name=name,
        architecture=name.split("-", 1)[0],
        labels=MODEL_LABELS[name],
        resolution=resolution,
        op_thresholds=thresholds,
        url=RELEASE_URL + file_name,
    )


CATALOGUE: dict[str, CatalogueEntry] = {name: _entry(name) for name in MODEL_NAMES}
