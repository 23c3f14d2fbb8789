"""Open the generated report in headless Chromium and use it like a person would.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the PyPI package
``selenium``; skipped (with the reason) only when one of them is not installed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from render_fakes import EVIL_CLASS
from vitlens.render import write_report

CHROMIUM = os.environ.get("VITLENS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("VITLENS_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if not os.access(CHROMEDRIVER, os.X_OK):
    pytest.skip(f"chromedriver not installed at {CHROMEDRIVER} (apt-get install chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,1600",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from trying to download anything.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open_report(browser, run_dir):
    report = write_report(run_dir.root)
    browser.get(report.as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return report


def _visible_rows(browser):
    return [r for r in browser.find_elements(By.CSS_SELECTOR, "tr.item") if r.is_displayed()]


def test_gallery_images_render_and_load(browser, run_dir):
    _open_report(browser, run_dir)
    cells = browser.find_elements(By.CSS_SELECTOR, "img.cell")
    assert len(cells) == run_dir.n_cells
    # Thumbnails are lazy-loaded: bring each into view, then wait until every one decoded.
    browser.execute_script("document.querySelectorAll('img.cell').forEach(function (i) { i.scrollIntoView(); });")
    loaded = (
        "return Array.prototype.map.call(document.querySelectorAll('img.cell'),"
        " function (i) { return i.complete && i.naturalWidth > 0; });"
    )
    WebDriverWait(browser, 20).until(lambda d: all(d.execute_script(loaded)))
    assert all(c.is_displayed() for c in cells)
    assert len(_visible_rows(browser)) == run_dir.n_rows
    # No script injected by hostile names, and the page's own code ran without errors.
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 2
    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == []


def test_class_filter_hides_other_classes(browser, run_dir):
    _open_report(browser, run_dir)
    select = Select(browser.find_element(By.ID, "class-filter"))
    for name, count in run_dir.rows_by_class.items():
        select.select_by_value(name)
        rows = _visible_rows(browser)
        assert len(rows) == count, name
        assert {r.get_attribute("data-pred") for r in rows} == {name}
        assert browser.find_element(By.ID, "shown-count").text == f"{count} of {run_dir.n_rows} rows"
    # The hostile class name round-trips through escaping and is selectable by its visible text.
    select.select_by_visible_text(EVIL_CLASS)
    assert len(_visible_rows(browser)) == run_dir.rows_by_class[EVIL_CLASS]
    select.select_by_visible_text("all")
    assert len(_visible_rows(browser)) == run_dir.n_rows


def test_clicking_a_thumbnail_opens_enlarged_view(browser, run_dir):
    _open_report(browser, run_dir)
    box = browser.find_element(By.ID, "lightbox")
    big = browser.find_element(By.ID, "lightbox-img")
    assert not box.is_displayed()

    thumb = browser.find_elements(By.CSS_SELECTOR, "img.cell")[1]  # an overlay, not the original
    thumb.click()
    WebDriverWait(browser, 10).until(lambda d: box.is_displayed())
    assert big.get_attribute("src") == thumb.get_attribute("src")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return arguments[0].naturalWidth > 0;", big))
    assert big.size["width"] > thumb.size["width"]  # actually enlarged
    assert browser.find_element(By.ID, "lightbox-caption").text == thumb.get_attribute("data-caption")

    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    WebDriverWait(browser, 10).until(lambda d: not box.is_displayed())

    thumb.click()
    WebDriverWait(browser, 10).until(lambda d: box.is_displayed())
    box.click()
    WebDriverWait(browser, 10).until(lambda d: not box.is_displayed())
