import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from render_fakes import EVIL_CLASS, EVIL_ERROR, EVIL_FILE, EVIL_LABEL, EVIL_SPEC, build_run_dir
from vitlens.errors import InputError
from vitlens.render import write_report
from vitlens.render.report import json_for_script


class _Collector(HTMLParser):
    """Collects the elements the tests look at, with attributes already unescaped."""

    def __init__(self):
        super().__init__()
        self.cells, self.rows, self.options, self.scripts = [], [], [], []
        self._in_option = self._in_script = False
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and "cell" in (a.get("class") or "").split():
            self.cells.append(a)
        elif tag == "tr" and "item" in (a.get("class") or "").split():
            self.rows.append(a)
        elif tag == "option":
            self.options.append(a)
        elif tag == "script":
            self.scripts.append([a, ""])
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1][1] += data
        else:
            self.text.append(data)


def _parse(path: Path) -> _Collector:
    c = _Collector()
    c.feed(path.read_text(encoding="utf-8"))
    return c


def test_writes_report_html_in_run_dir(run_dir):
    path = write_report(run_dir.root)
    assert path == run_dir.root / "report.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # Atomic write: no temp file left behind.
    assert not [p for p in run_dir.root.iterdir() if p.name.endswith(".tmp")]


def test_hostile_strings_are_escaped(run_dir):
    html_text = write_report(run_dir.root).read_text(encoding="utf-8")
    assert "<script>alert" not in html_text
    assert "</script><script>alert" not in html_text
    assert "<b>bold</b>" not in html_text
    assert "<truncated>" not in html_text
    assert html_text.count("<script") == 2  # our JSON blob + our code, nothing injected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html_text
    assert "we&quot;ird&amp;&#x27;&lt;&gt;#%.png" in html_text
    # ...and they read back verbatim as text.
    text = "".join(_parse(run_dir.root / "report.html").text)
    for needle in (EVIL_LABEL, EVIL_CLASS, EVIL_ERROR, EVIL_SPEC, EVIL_FILE):
        assert needle in text


def test_embedded_json_is_script_safe_and_parses(run_dir):
    parsed = _parse(write_report(run_dir.root))
    (attrs, blob), (_, code) = parsed.scripts
    assert attrs.get("type") == "application/json"
    assert "<" not in blob and ">" not in blob and "&" not in blob
    data = json.loads(blob)
    assert data["model"] == EVIL_SPEC
    assert data["counts"] == {"images": 4, "ok": 3, "failed": 1, "rows": 4, "overlays": 7}
    assert "<" not in code.replace("<script", "")  # the JS itself compares with ===, never <


def test_json_for_script_escapes_everything_dangerous():
    out = json_for_script({"a": "</script><!--&\u2028"})
    assert out == '{"a": "\\u003c/script\\u003e\\u003c!--\\u0026\\u2028"}'
    assert json.loads(out) == {"a": "</script><!--&\u2028"}


def test_gallery_counts_and_relative_links_resolve(run_dir):
    parsed = _parse(write_report(run_dir.root))
    assert len(parsed.cells) == run_dir.n_cells
    assert len(parsed.rows) == run_dir.n_rows
    for cell in parsed.cells:
        url = cell["src"]
        assert not urlparse(url).scheme, url  # relative: the run dir can be moved or zipped
        target = (run_dir.root / unquote(url)).resolve()
        assert target.is_file(), url
        assert run_dir.root.resolve() in target.parents
    html_text = (run_dir.root / "report.html").read_text(encoding="utf-8")
    assert html_text.count('class="na"') == run_dir.n_na


def test_class_filter_lists_predicted_classes(run_dir):
    parsed = _parse(write_report(run_dir.root))
    values = [o.get("value") for o in parsed.options]
    assert values[0] == ""  # "all"
    assert sorted(values[1:]) == sorted(run_dir.rows_by_class)
    preds = [r["data-pred"] for r in parsed.rows]
    for name, count in run_dir.rows_by_class.items():
        assert preds.count(name) == count


def test_header_failed_and_metrics_sections(run_dir):
    html_text = write_report(run_dir.root, title="My <run>").read_text(encoding="utf-8")
    assert "<title>My &lt;run&gt;</title>" in html_text
    assert "rollout" in html_text and "gmar-l2" in html_text and "head_fusion" in html_text
    assert 'id="failed"' in html_text and "Failed inputs (1)" in html_text
    metrics = re.search(r'<section id="metrics">(.*?)</section>', html_text).group(1)
    assert "deletion_auc" in metrics and "0.2135" in metrics and "—" in metrics


def test_no_metrics_section_without_metrics(run_dir):
    manifest = run_dir.manifest
    del manifest["metrics"]
    (run_dir.root / "manifest.json").write_text(json.dumps(manifest))
    assert 'id="metrics"' not in write_report(run_dir.root).read_text(encoding="utf-8")


def test_zero_successful_images(tmp_path):
    manifest = {
        "model": {"spec": "timm:x"},
        "methods": {"rollout": {}},
        "images": [{"key": "bad", "path": "/abs/bad.jpg", "status": "failed", "error": "boom <x>",
                    "label": None, "label_name": None, "prediction": None, "targets": [], "outputs": []}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    parsed = _parse(write_report(tmp_path))
    assert parsed.cells == [] and parsed.rows == []
    text = "".join(parsed.text)
    assert "boom <x>" in text and "No image was explained" in text


def test_minimal_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    assert "vitlens report" in write_report(tmp_path).read_text(encoding="utf-8")


def test_missing_original_falls_back_to_file_url(tmp_path):
    img_path = tmp_path / "elsewhere" / "a b#1.png"
    img_path.parent.mkdir()
    img_path.write_bytes(b"")
    manifest = {
        "methods": {"rollout": {}},
        "images": [{"key": "k", "path": str(img_path), "status": "ok", "label": None,
                    "prediction": {"index": 1, "name": "x", "prob": 0.5},
                    "targets": [{"index": 1, "name": "x", "prob": 0.5}], "outputs": []}],
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(manifest))
    parsed = _parse(write_report(run))
    assert len(parsed.cells) == 1  # original only; the missing overlay is "n/a"
    src = parsed.cells[0]["src"]
    assert src == img_path.as_uri() and "#" not in src
    assert Path(unquote(urlparse(src).path)) == img_path


def test_missing_manifest_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value) and "manifest.json" in str(info.value)


def test_malformed_manifest_is_one_line_input_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError) as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(InputError):
        write_report(tmp_path)


def test_report_can_be_regenerated(tmp_path):
    run = build_run_dir(tmp_path / "r")
    first = write_report(run.root).read_text(encoding="utf-8")
    second = write_report(run.root).read_text(encoding="utf-8")
    assert first == second
