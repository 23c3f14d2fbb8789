"""Attention views, coloured tokens and the head view render (PNG, SVG, HTML), also for 512 tokens."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from vitlens.errors import InputError
from vitlens.text import attention_views, explain_text
from vitlens.text.html import head_view_html, tokens_page_html


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.data, self._in = 0, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
            self._in = dict(attrs).get("id")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in == "vitlens-data":
            self.data.append(data)


def _check_files(written):
    for paths in written.values():
        for path in paths:
            assert path.stat().st_size > 0, path
            if path.suffix == ".png":
                with Image.open(path) as image:
                    image.verify()
                with Image.open(path) as image:
                    assert min(image.size) > 50
            elif path.suffix == ".svg":
                assert ET.parse(path).getroot().tag.endswith("svg")
            elif path.suffix == ".html":
                parser = _Scripts()
                parser.feed(path.read_text(encoding="utf-8"))
                if path.name == "head_view.html":
                    assert parser.scripts == 2
                    assert json.loads("".join(parser.data))["layers"] == 2


def test_every_view_renders(tiny_classifier, tmp_path):
    written = attention_views(tiny_classifier, "The movie was surprisingly good!", out=tmp_path, query="movie",
                              methods="rollout,chefer,legrad")
    assert set(written) == {"tokens", "heads", "overview", "query", "headview", "stats"}
    _check_files(written)
    names = {p.name for paths in written.values() for p in paths}
    assert {"heads-layer1.png", "heads-layer1.svg", "overview.svg", "query-2.png", "head_view.html", "tokens.html",
            "tokens.png", "tokens.svg", "stats.csv", "stats.png", "stats.svg", "attributions.json"} <= names
    record = json.loads((tmp_path / "attributions.json").read_text())
    assert record["sequences"][0]["tokens"][:3] == ["[CLS]", "the", "movie"]
    assert set(record["sequences"][0]["scores"]) == {"rollout", "chefer", "legrad"}
    assert len((tmp_path / "stats.csv").read_text().splitlines()) == 1 + 2 * 4  # header + layers x heads


def test_512_token_input_renders_and_513_is_refused(tiny_classifier, tmp_path):
    words = ("the cat sat on a warm mat while it rained " * 60).split()
    text = " ".join(words[:510])  # + [CLS] and [SEP] = 512 tokens, the model's limit
    written = attention_views(tiny_classifier, text, out=tmp_path, methods="rollout,chefer", layer=0, query=-1)
    _check_files(written)
    record = json.loads((tmp_path / "attributions.json").read_text())
    assert len(record["sequences"][0]["tokens"]) == 512
    with pytest.raises(InputError) as info:
        explain_text(tiny_classifier, text + " again", methods=[])
    assert "513 tokens" in str(info.value) and "\n" not in str(info.value)
    cut = explain_text(tiny_classifier, text + " again", methods=["rollout"], truncate=True)
    assert len(cut.items[0].sequences[0].tokens) == 512


def test_hostile_tokens_and_texts_are_escaped():
    hostile = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "&amp;", "\u2028"]
    attention = np.full((1, 2, 4, 4), 0.25, dtype=np.float32)
    page = head_view_html([{"title": "<b>title</b>", "tokens": hostile, "special": [False] * 4,
                            "attention": attention}], title="<i>t</i>", meta="<u>m</u>")
    parser = _Scripts()
    parser.feed(page)
    assert parser.scripts == 2
    data = json.loads("".join(parser.data))
    assert data["sequences"][0]["tokens"] == hostile
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    tokens = tokens_page_html([{"heading": "<h1>x</h1>", "caption": "<script>", "rows": [
        {"label": "<m>", "tokens": hostile, "space": [False, True, True, True], "values": np.linspace(0, 1, 4),
         "special": [False] * 4}]}])
    assert "<script" not in tokens and "<img" not in tokens and "<m>" not in tokens and "<h1>x" not in tokens


CHROMIUM = os.environ.get("VITLENS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("VITLENS_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_head_view_opens_from_disk_and_reacts_to_hover(tiny_classifier, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    written = attention_views(tiny_classifier, "a <b>bold</b> claim", out=tmp_path, views="headview")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(written["headview"][0].as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
        left = driver.find_elements(By.CSS_SELECTOR, "svg text.left")
        assert [t.text for t in left][:4] == ["[CLS]", "a", "<", "b"]
        ActionChains(driver).move_to_element(left[1]).perform()
        lines = driver.find_elements(By.CSS_SELECTOR, "#lines line")
        heads = 4
        # the hovered token's links only: at most one per head and key, all starting at its row
        assert 0 < len(lines) <= heads * len(left)
        assert len({line.get_attribute("y1") for line in lines}) == 1
        right = driver.find_elements(By.CSS_SELECTOR, "svg text.right")
        ActionChains(driver).move_to_element(right[0]).perform()  # who attends to [CLS]: every line ends there
        lines = driver.find_elements(By.CSS_SELECTOR, "#lines line")
        assert lines and len({line.get_attribute("y2") for line in lines}) == 1
        Select(driver.find_element(By.ID, "layer")).select_by_value("0")
        first_head = driver.find_elements(By.CSS_SELECTOR, ".head")[0]
        colour = first_head.value_of_css_property("background-color")
        first_head.click()  # head 0 off: none of its lines is drawn
        ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, "svg text.left")[1]).perform()
        strokes = {line.get_attribute("stroke") for line in driver.find_elements(By.CSS_SELECTOR, "#lines line")}
        assert colour == "rgba(31, 119, 180, 1)"  # head 0's colour, #1f77b4
        assert strokes and "#1f77b4" not in strokes
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 2
        assert [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"] == []
    finally:
        driver.quit()
