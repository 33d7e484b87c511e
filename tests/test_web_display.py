"""What a newcomer sees on the study page: every card fits the window at 1024-1400 px, the
heatmap caption keeps the decision-support notice (and UNTRAINED) after switching finding,
missing fields say "not given" instead of "- · -", and DICOM dates and times read as ISO 8601.

The browser test drives headless Chromium (Debian's /usr/bin/chromium through playwright,
nothing downloaded) against a real seeded node; the page tests use the app on a real database.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright
from sqlalchemy import select, update

from dicom_node.db.models import AnalysisResult, Study
from dicom_node.db.session import session_scope
from dicom_node.inference.models import UNTRAINED_LABEL
from dicom_node.outputs.sr import AI_NOTICE
from dicom_node.web.rendering import dicom_date, dicom_time
from tests.web_db import T0, add_study, log_in, web_db
from tests.web_support import PASSWORD, seed

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
WIDTHS = (1024, 1280, 1400)

# Every element that sticks out of the page, or out of the card it sits in (1 px slack for
# sub-pixel rounding).  An empty list means nothing needs a horizontal scroll.
OVERFLOW_JS = """() => {
  const found = [];
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth || root.scrollWidth > window.innerWidth) {
    found.push(`page ${root.scrollWidth} > ${root.clientWidth}`);
  }
  const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
      + (el.className && typeof el.className === 'string' ? '.' + el.className.trim() : '');
  for (const card of document.querySelectorAll('.card')) {
    const box = card.getBoundingClientRect();
    if (card.scrollWidth > card.clientWidth + 1) {
      found.push(`${name(card)} scrolls ${card.scrollWidth} > ${card.clientWidth}`);
    }
    for (const el of card.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1)) {
        found.push(`${name(el)} [${r.left}, ${r.right}] outside ${name(card)} `
                   + `[${box.left}, ${box.right}]`);
      }
    }
  }
  return found;
}"""


def _overflow_at(page: Page, width: int) -> list[str]:
    page.set_viewport_size({"width": width, "height": 900})
    page.wait_for_timeout(100)  # one layout pass after the resize
    found: list[str] = page.evaluate(OVERFLOW_JS)
    return found


@pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium")
def test_the_study_page_fits_1024_to_1400_px_and_the_caption_keeps_the_ai_notice(
    node_factory: Any, db_url: str, tmp_path: Path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the browser test runs on one database; the page tests cover both")
    seeded = seed(node_factory)
    study = seeded.uids["critical_old"]
    with session_scope(seeded.node.session_factory) as session:  # as the demo model stores it
        session.execute(
            update(AnalysisResult)
            .where(AnalysisResult.study_instance_uid == study)
            .values(weights_status="untrained")
        )
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1024, "height": 900}, bypass_csp=True)
            page.goto(f"{seeded.url}/login")
            page.fill("#username", "rad")
            page.fill("#password", PASSWORD)
            page.click("#login")
            page.wait_for_selector("#worklist")
            assert _overflow_at(page, 1024) == []
            page.goto(f"{seeded.url}/studies/{study}")
            page.wait_for_function("document.getElementById('study-image').naturalWidth > 0")
            caption = page.inner_text("#heatmap-caption")
            assert "Pneumothorax" in caption and AI_NOTICE in caption
            assert UNTRAINED_LABEL in caption
            for width in WIDTHS:
                assert _overflow_at(page, width) == [], width
                page.screenshot(path=str(tmp_path / f"study-{width}.png"), full_page=True)

            page.click("#heatmap-switcher a[data-heatmap='Edema']")
            page.wait_for_function(
                "document.getElementById('study-image').src.includes('finding=Edema')"
            )
            caption = page.inner_text("#heatmap-caption")
            assert "Edema" in caption and "Pneumothorax" not in caption
            assert AI_NOTICE in caption and UNTRAINED_LABEL in caption
            page.click("#heatmap-switcher a[data-heatmap='']")
            caption = page.inner_text("#heatmap-caption")
            assert "Image only" in caption and AI_NOTICE in caption
            assert UNTRAINED_LABEL in caption
            browser.close()
    finally:
        seeded.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in tmp_path.glob("*.png"):
        shutil.copy(shot, ARTIFACTS / shot.name)


def test_a_study_without_accession_or_description_says_not_given_once_each(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    with db.session() as session:
        add_study(session, "1.2.5.7", T0, positives=("Pneumothorax",))
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == "1.2.5.7")
            .values(accession_number=None, study_description=None, patient_id=None, study_date=None)
        )
    log_in(db.client)
    page = db.client.get("/studies/1.2.5.7")
    assert page.status_code == 200
    assert "- · -" not in page.text
    facts = page.text.split('id="study-facts"', 1)[1].split("</p>", 1)[0]
    assert "· -" not in facts
    assert "Accession not given" in facts and "description not given" in facts
    assert "study date not given" in facts
    assert "<title>Study  ·" not in page.text


def test_the_study_page_shows_the_dicom_study_date_and_time_as_iso_8601(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    with db.session() as session:
        add_study(session, "1.2.5.8", T0)
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == "1.2.5.8")
            .values(study_date="19010101", study_time="093015.123")
        )
        assert session.scalar(select(Study.study_date)) == "19010101"
    log_in(db.client)
    page = db.client.get("/studies/1.2.5.8").text
    assert "1901-01-01 09:30:15" in page and "19010101" not in page


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("19010101", "1901-01-01"),
        ("20260302", "2026-03-02"),
        (" 20260302 ", "2026-03-02"),
        ("2026.03.02", "2026-03-02"),  # the ACR-NEMA form PS3.5 6.2 says may be met
        ("20260230", "20260230"),
        ("2026", "2026"),
        ("202603", "202603"),
        ("abcdefgh", "abcdefgh"),
        ("", ""),
        (None, ""),
    ],
)
def test_dicom_dates_read_as_iso_8601_and_anything_else_as_given(
    value: str | None, shown: str
) -> None:
    assert dicom_date(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0930", "09:30"),
        ("093015", "09:30:15"),
        ("093015.123456", "09:30:15"),
        ("09:30:15", "09:30:15"),  # the ACR-NEMA form PS3.5 6.2 says may be met
        ("235960", "23:59:60"),  # a leap second is a valid TM
        ("09", "09"),
        ("2460", "2460"),
        ("0960", "0960"),
        ("12ab", "12ab"),
        ("093015.", "093015."),
        ("", ""),
        (None, ""),
    ],
)
def test_dicom_times_read_as_hh_mm_ss_and_anything_else_as_given(
    value: str | None, shown: str
) -> None:
    assert dicom_time(value) == shown
