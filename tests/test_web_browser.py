"""The worklist in headless Chromium (Debian's /usr/bin/chromium through playwright; nothing
is downloaded): log in, see the studies in priority order, open one, switch its heatmap,
give feedback, log out.  Screenshots are kept under test-artifacts/web/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright
from sqlalchemy import select

from dicom_node.db.models import AnalysisResult
from dicom_node.db.session import session_scope
from tests.web_support import PASSWORD, SCRIPT_NAME, seed

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium")
def test_radiologist_logs_in_reads_the_worklist_switches_a_heatmap_and_gives_feedback(
    node_factory: Any, db_url: str, tmp_path: Path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the browser test runs on one database; test_web_auth covers both")
    seeded = seed(node_factory)
    dialogs: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            # CSP is bypassed so the test can evaluate scripts, and so escaping alone must stop the
            # script in the patient name.
            page = browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(f"{seeded.url}/worklist")
            assert "/login" in page.url
            page.fill("#username", "rad")
            page.fill("#password", PASSWORD)
            page.click("#login")
            page.wait_for_selector("#worklist")
            rows = page.locator("#worklist tbody tr")
            assert [rows.nth(i).get_attribute("data-study") for i in range(3)] == [
                seeded.uids["script"],
                seeded.uids["critical_old"],
                seeded.uids["lateral"],
            ]
            assert page.locator(".patient-name").first.inner_text() == SCRIPT_NAME
            assert "AI result – decision support" in page.inner_text(".notice")
            page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)

            page.click(f"tr[data-study='{seeded.uids['critical_old']}'] a.open")
            page.wait_for_selector("#study-image")
            page.wait_for_function("document.getElementById('study-image').naturalWidth > 0")
            assert page.get_attribute("#study-image", "data-finding") == "Pneumothorax"
            page.click("#heatmap-switcher a[data-heatmap='Edema']")
            page.wait_for_function(
                "document.getElementById('study-image').src.includes('finding=Edema')"
                " && document.getElementById('study-image').complete"
            )
            assert "Edema" in page.inner_text("#heatmap-caption")
            assert "Pneumothorax" in page.inner_text("#findings")
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)

            form = page.locator("tr[data-label='Pneumothorax'] form.feedback")
            form.locator("input[name='comment']").fill("agree: apical pleural line")
            form.locator("button[value='agree']").click()
            page.wait_for_selector("#feedback-list td:has-text('apical pleural line')")
            assert "rad" in page.inner_text("#feedback-list")
            page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)

            page.click("#logout")
            page.wait_for_selector("#login")
            page.goto(f"{seeded.url}/worklist")
            assert "/login" in page.url
            browser.close()
    finally:
        seeded.stop()
    assert dialogs == []  # the script in the patient name never ran
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in tmp_path.glob("*.png"):
        shutil.copy(shot, ARTIFACTS / shot.name)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium")
def test_a_shadow_models_results_never_reach_the_radiologist_but_the_admin_sees_them_marked(
    node_factory: Any, db_url: str, tmp_path: Path
) -> None:
    """One model, in shadow mode: it analyses every study (Pneumothorax positive on all of
    them at this threshold), the radiologist's worklist and study page show no AI result,
    and the admin's validation page shows the model marked SHADOW."""
    if not db_url.startswith("sqlite"):
        pytest.skip("the browser test runs on one database; test_web_validation covers both")
    from dicom_node.config.models import ModelSpec
    from tests.conftest import MODEL_NAME

    seeded = seed(node_factory, models=(ModelSpec("challenger", MODEL_NAME, mode="shadow"),))
    try:
        with session_scope(seeded.node.session_factory) as session:
            modes = set(session.scalars(select(AnalysisResult.mode)))
        assert modes == {"shadow"}  # the shadow model did analyse the studies
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            _log_in(page, seeded.url, "rad")
            assert "Pneumothorax" not in page.inner_text("#worklist")
            page.goto(f"{seeded.url}/studies/{seeded.uids['critical_old']}")
            assert "Pneumothorax" not in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "shadow-radiologist.png"), full_page=True)
            page.click("#logout")
            _log_in(page, seeded.url, "boss")
            page.goto(f"{seeded.url}/admin/validation")
            assert "SHADOW" in page.inner_text("body") and "challenger" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "shadow-admin.png"), full_page=True)
            browser.close()
    finally:
        seeded.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in tmp_path.glob("*.png"):
        shutil.copy(shot, ARTIFACTS / shot.name)


def _log_in(page: Any, url: str, username: str) -> None:
    page.goto(f"{url}/worklist")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{url}/worklist")
