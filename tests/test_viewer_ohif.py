"""The node's results seen in the OHIF viewer (issue 14 item 4), with real parts only.

Orthanc with Debian's DICOMweb plugin is the PACS; the prebuilt OHIF 3.13.2 from the npm
registry is served on 127.0.0.1 with Orthanc's DICOMweb root on the same origin
(tests/viewer_support.py); headless Chromium (Debian's, software WebGL) drives it.  Orthanc
sends a study to the node, the node delivers its SR and SC back (once by C-STORE, once by
STOW-RS), and the test reads from the page: the SR is listed and loads, the names of its
findings are in the measurements panel, its boxes are drawn on the source image (pixels on
each box's outline change between the bare image and the image with the SR loaded), and the
SC displays.  Screenshots: test-artifacts/viewer/<delivery>/ (and the test's tmp_path).
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.config.settings import PeerSettings, SchedulerSettings
from dicom_node.db.models import Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from tests.conftest import wait_until
from tests.helpers import NODE_AE
from tests.peers import Orthanc
from tests.viewer_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SKIP_TOUR,
    ViewerUnavailable,
    image_to_page,
    ohif_dist,
    outline_drawn,
    region_pixels,
    viewer,
    viewport_state,
    webgl_renderer,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "viewer"
# The test network calls Cardiomegaly positive at this operating point (so one finding at
# least has boxes: each box of a positive finding is a SCOORD region of the SR).
LOW_THRESHOLDS = (("Cardiomegaly", 0.001),)
IMAGING_MEASUREMENTS, MEASUREMENT_GROUP, FINDING = "126010", "125007", "121071"
# Orthanc's record of how an instance arrived (GET /instances/{id}/metadata/Origin).
ORIGIN = {"cstore": "DicomProtocol", "stowrs": "Plugins"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium"),
]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # one database is enough here
@pytest.mark.parametrize("delivery", ["cstore", "stowrs"])
def test_ohif_lists_and_loads_the_sr_names_its_findings_draws_its_boxes_and_shows_the_sc(
    delivery: str, node_factory: Any, tmp_path: Path
) -> None:
    try:
        dist = ohif_dist()
    except ViewerUnavailable as exc:
        pytest.skip(str(exc))
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True)
    peer = PeerSettings(
        name="orthanc",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        send_results=True,
        dicomweb_url=orthanc.dicomweb_url if delivery == "stowrs" else "",
    )
    node = node_factory(
        roles=("scp", "worker"),
        peers=(peer,),
        scheduler=SchedulerSettings(study_quiet_seconds=1, tick_seconds=0.2),
        thresholds=LOW_THRESHOLDS,
    )
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        orthanc.start(NODE_AE, node.scp_port)
        source = make_cxr_dataset(rows=1024, columns=896)
        study = orthanc.relay_to_node(source)
        sr, sc = _delivered(node, orthanc, study, delivery)
        regions = _regions(sr)
        assert regions, "the SR holds no SCOORD region: no positive finding with a box"
        _in_ohif(dist, orthanc, study, source, sr, sc, regions, tmp_path, shots)
    finally:
        orthanc.stop()
        target = ARTIFACTS / delivery
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(shots, target)


def _delivered(
    node: Any, orthanc: Orthanc, study: str, delivery: str
) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """Wait for the node's SR and SC to be in Orthanc, delivered the way the test asked."""

    def outputs() -> dict[str, Output]:
        with session_scope(node.session_factory) as session:
            rows = session.scalars(select(Output).where(Output.study_instance_uid == study))
            return {o.kind: o for o in rows}

    def held() -> dict[str, str]:
        found = orthanc.instances_of_study(study)
        return {i["MainDicomTags"].get("SOPInstanceUID", ""): i["ID"] for i in found}

    def delivered() -> bool:
        with session_scope(node.session_factory) as session:
            states = set(session.scalars(select(Job.state).where(Job.kind == "delivery")))
        ours = outputs()
        return (
            states == {"done"}
            and {"sr", "sc"} <= set(ours)
            and {
                ours["sr"].sop_instance_uid,
                ours["sc"].sop_instance_uid,
            }
            <= set(held())
        )

    assert wait_until(delivered, timeout=180, interval=0.5), (outputs(), held())
    ours, in_orthanc = outputs(), held()
    for kind in ("sr", "sc"):
        metadata = f"/instances/{in_orthanc[ours[kind].sop_instance_uid]}/metadata/Origin"
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}{metadata}") as answer:
            origin = answer.read().decode()
        assert origin == ORIGIN[delivery], (kind, origin)
    root = Path(node.settings.storage.root)
    return pydicom.dcmread(root / ours["sr"].path), pydicom.dcmread(root / ours["sc"].path)


def _regions(sr: pydicom.Dataset) -> list[tuple[str, list[float]]]:
    """(finding name, box corners x0 y0 x1 y1) of each SCOORD region of the TID 1500 report."""
    found = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != IMAGING_MEASUREMENTS:
            continue
        for group in container.ContentSequence:
            if group.ConceptNameCodeSequence[0].CodeValue != MEASUREMENT_GROUP:
                continue
            items = list(group.ContentSequence)
            names = [
                i.ConceptCodeSequence[0].CodeMeaning
                for i in items
                if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == FINDING
            ]
            for item in items:
                if item.ValueType == "SCOORD":
                    points = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
                    box = [*points.min(axis=0), *points.max(axis=0)]
                    found.append((names[0], [float(v) for v in box]))
    return found


def _in_ohif(
    dist: Path,
    orthanc: Orthanc,
    study: str,
    source: pydicom.Dataset,
    sr: pydicom.Dataset,
    sc: pydicom.Dataset,
    regions: list[tuple[str, list[float]]],
    tmp_path: Path,
    shots: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with viewer(dist, orthanc.http_port, tmp_path / "app-config.js") as server:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.add_init_script(SKIP_TOUR)
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                page.on("console", lambda m: _keep_error(problems, m.type, m.text))
                _check_page(page, server.url, study, source, sr, sc, regions, shots, problems)
            finally:
                browser.close()


def _check_page(
    page: Any,
    url: str,
    study: str,
    source: pydicom.Dataset,
    sr: pydicom.Dataset,
    sc: pydicom.Dataset,
    regions: list[tuple[str, list[float]]],
    shots: Path,
    problems: list[str],
) -> None:
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study}")
    assert webgl_renderer(page), "no WebGL in this Chromium (OHIF needs it)"

    # The study browser lists the SR and the SC series with the source image.
    sr_thumb = page.locator(f'[data-series="{sr.SeriesNumber}"]')
    sc_thumb = page.locator(f'[data-series="{sc.SeriesNumber}"]')
    sr_thumb.wait_for(timeout=60_000)
    sc_thumb.wait_for(timeout=60_000)
    assert sr_thumb.locator('[data-cy="series-modality-label"]').inner_text() == "SR"
    assert (
        sr_thumb.locator('[data-cy="series-description-label"]').inner_text()
        == sr.SeriesDescription
    )

    # The bare source image, with the measurements panel open (the viewport keeps its size).
    page.click('[data-cy="side-panel-header-right"]')
    page.click('[data-cy="trackedMeasurements-btn"]')
    _wait_shown(page, str(source.SOPInstanceUID))
    time.sleep(1.0)  # the last frame of the first render
    page.screenshot(path=str(shots / "1-source-bare.png"))
    rect = viewport_state(page)["rect"]  # type: ignore[index]
    clip = {k: float(rect[k]) for k in ("x", "y", "width", "height")}
    bare = region_pixels(page, clip)
    assert bare.std() > 10, "the source image did not render (a blank viewport)"
    where_before = [image_to_page(page, [(b[0], b[1]), (b[2], b[3])]) for _, b in regions]

    # Load the SR: OHIF opens it in its SR viewport and asks to track its measurements.
    sr_thumb.dblclick()
    prompt = page.get_by_text("Do you want to continue tracking measurements for this study?")
    broken = page.get_by_text("Something went wrong")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not prompt.count() and not broken.count():
        page.wait_for_timeout(250)
    page.screenshot(path=str(shots / "2-sr-opened.png"))
    assert prompt.count() and not broken.count(), (
        "OHIF could not load the node's SR: " + "; ".join(problems[-5:])[:3000]
    )
    page.get_by_role("button", name="Yes", exact=True).click()
    panel = page.locator('[data-cy="trackedMeasurements-panel"]').filter(visible=True).first
    panel.wait_for(timeout=30_000)
    assert wait_until(lambda: f"Measurements ({len(regions)})" in panel.inner_text(), 30), (
        panel.inner_text()[:500],
        len(regions),
    )
    _wait_shown(page, str(source.SOPInstanceUID))
    time.sleep(1.0)
    page.screenshot(path=str(shots / "3-sr-loaded.png"))

    # The finding names of the SR, in OHIF's measurements panel.
    listed = panel.inner_text()
    for name in sorted({name for name, _ in regions}):
        assert name in listed, (name, listed[:2000])

    # The boxes, drawn on the source image where the SR puts them.
    loaded = region_pixels(page, clip)
    where_after = [image_to_page(page, [(b[0], b[1]), (b[2], b[3])]) for _, b in regions]
    assert np.allclose(where_before, where_after, atol=1.0), "the view moved between shots"
    origin = (clip["x"], clip["y"])
    inside = [
        (name, corners)
        for (name, _), corners in zip(regions, where_after, strict=True)
        if all(
            0 <= x - origin[0] < clip["width"] and 0 <= y - origin[1] < clip["height"]
            for x, y in corners
        )
        and abs(corners[1][0] - corners[0][0]) > 40
        and abs(corners[1][1] - corners[0][1]) > 40
    ]
    assert inside, "no box of the SR is large enough and inside the viewport to check"
    for name, corners in inside:
        local = [(x - origin[0], y - origin[1]) for x, y in corners]
        edges = outline_drawn(bare, loaded, local)
        assert min(edges) >= 0.8, (name, corners, edges)

    # The SC series displays: its image in the viewport, not a blank canvas.
    sc_thumb.dblclick()
    _wait_shown(page, str(sc.SOPInstanceUID))
    time.sleep(1.0)
    page.screenshot(path=str(shots / "4-sc.png"))
    shown = region_pixels(page, clip)
    assert shown.std() > 10 and np.abs(shown - bare).mean() > 5, "the SC did not display"


def _keep_error(problems: list[str], kind: str, text: str) -> None:
    """Console errors, and what OHIF's error boundaries log (at debug level)."""
    if kind == "error" or "Error Boundary" in text:
        problems.append(f"console {kind}: {text}")


def _wait_shown(page: Any, sop_instance_uid: str, timeout: float = 60) -> None:
    """Wait until OHIF's viewport shows the image ``sop_instance_uid`` (and has drawn it)."""

    def shown() -> bool:
        state = viewport_state(page)
        return bool(state and sop_instance_uid in state["imageId"])

    assert wait_until(shown, timeout, 0.25), (sop_instance_uid, viewport_state(page))
