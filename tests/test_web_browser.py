"""The worklist in headless Chromium (Debian's /usr/bin/chromium through playwright; nothing
is downloaded): log in, see the studies in priority order, open one, switch its heatmap,
give feedback, log out.  Screenshots are kept under test-artifacts/web/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

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
