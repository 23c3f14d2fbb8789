"""A single static HTML page summarising a run directory.

The page must open straight from disk (``file://``), be copyable as a folder, and never
execute anything that came from the data: every string that originates from a manifest
(file names, labels, class names, errors, model spec) is HTML-escaped, and the one JSON
blob embedded in a ``<script>`` element has ``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc.
Images are referenced by relative URLs so moving the run directory keeps the links intact.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from vitlens.errors import InputError
from vitlens.render.atomic import write_text_atomic

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.html"


# --------------------------------------------------------------------------- escaping helpers


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` for text and double- or single-quoted attributes; ``None`` -> ``""``."""
    return "" if value is None else html.escape(str(value), quote=True)


def json_for_script(obj: Any) -> str:
    """Serialise ``obj`` as JSON that is safe inside a ``<script>`` element.

    ``</script>`` or ``<!--`` in a string would otherwise end or confuse the element; U+2028/9
    are escaped because older JS engines treat them as line terminators inside string literals.
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def file_url(path: str) -> str:
    """URL for an image path from the manifest: relative paths stay relative (percent-encoded),
    absolute ones become ``file://`` URLs.

    Percent-encoding keeps ``#``, ``?``, ``%`` and quotes in file names from being read as URL
    syntax; it also turns a ``javascript:`` prefix into a harmless relative path.
    """
    if os.path.isabs(path):
        return Path(path).as_uri()
    return quote(str(PurePosixPath(path)), safe="/")


# --------------------------------------------------------------------------- manifest model


@dataclass
class _Cell:
    url: str
    caption: str


@dataclass
class _Row:
    key: str
    file_name: str
    path: str
    label: str
    prediction: str
    pred_name: str
    correct: bool | None
    target: str
    original: _Cell
    methods: dict[str, _Cell | None] = field(default_factory=dict)


def _class_text(index: Any, name: Any, prob: Any = None) -> str:
    parts = []
    if name not in (None, ""):
        parts.append(str(name))
    if index is not None:
        parts.append(f"(#{index})" if parts else f"#{index}")
    if isinstance(prob, (int, float)) and not isinstance(prob, bool):
        parts.append(f"{100.0 * float(prob):.1f}%")
    return " ".join(parts) if parts else "—"


def _method_names(manifest: dict) -> list[str]:
    methods = manifest.get("methods") or {}
    names = [str(m) for m in (methods.keys() if isinstance(methods, dict) else methods)]
    # Outputs for a method the header forgot to list still deserve a column.
    for image in _images(manifest):
        for out in image.get("outputs") or []:
            if isinstance(out, dict) and out.get("method") is not None:
                name = str(out["method"])
                if name not in names:
                    names.append(name)
    return names


def _images(manifest: dict) -> list[dict]:
    return [im for im in (manifest.get("images") or []) if isinstance(im, dict)]


def _rows_for_image(image: dict, methods: list[str]) -> list[_Row]:
    path = str(image.get("path") or "")
    file_name = PurePosixPath(path.replace("\\", "/")).name or str(image.get("key") or "?")
    original = image.get("original")
    original_url = file_url(str(original)) if original else (file_url(path) if path else "")
    pred = image.get("prediction") or {}
    label = image.get("label")
    correct = None
    if label is not None and pred.get("index") is not None:
        correct = label == pred.get("index")
    pred_name = pred.get("name")
    if pred_name in (None, "") and pred.get("index") is not None:
        pred_name = f"#{pred.get('index')}"

    outputs: dict[tuple[str, Any], str] = {}
    for out in image.get("outputs") or []:
        if isinstance(out, dict) and out.get("overlay"):
            outputs[(str(out.get("method")), out.get("target"))] = str(out["overlay"])

    targets = [t for t in (image.get("targets") or []) if isinstance(t, dict)]
    if not targets:
        # No target list: fall back to the targets the outputs mention, else a single row.
        seen = []
        for _, tgt in outputs:
            if tgt not in seen:
                seen.append(tgt)
        targets = [{"index": t} for t in seen] or [{"index": None}]

    label_name = image.get("label_name")
    label_text = _class_text(label, label_name) if label is not None or label_name else "unknown"
    pred_text = _class_text(pred.get("index"), pred.get("name"), pred.get("prob")) if pred else "—"
    rows = []
    for target in targets:
        target_text = _class_text(target.get("index"), target.get("name"), target.get("prob"))
        cells: dict[str, _Cell | None] = {}
        for method in methods:
            rel = outputs.get((method, target.get("index")))
            cells[method] = (
                _Cell(file_url(rel), f"{method} — {file_name} — target {target_text}") if rel else None
            )
        rows.append(
            _Row(
                key=str(image.get("key") or file_name),
                file_name=file_name,
                path=path,
                label=label_text,
                prediction=pred_text,
                pred_name=str(pred_name or ""),
                correct=correct,
                target=target_text,
                original=_Cell(original_url, f"original — {file_name}"),
                methods=cells,
            )
        )
    return rows


# --------------------------------------------------------------------------- HTML pieces


def _img(cell: _Cell) -> str:
    # loading="lazy" keeps runs with thousands of overlays responsive; tabindex makes the
    # thumbnails reachable with the keyboard (Enter opens the enlarged view).
    return (
        f'<img class="cell" src="{esc(cell.url)}" alt="{esc(cell.caption)}" '
        f'data-caption="{esc(cell.caption)}" loading="lazy" decoding="async" tabindex="0">'
    )


def _header_html(manifest: dict, methods: list[str], counts: dict[str, int], title: str) -> str:
    model = manifest.get("model") or {}
    prep = model.get("preprocess") or {}
    method_params = manifest.get("methods") if isinstance(manifest.get("methods"), dict) else {}
    facts = [
        ("Model", model.get("spec")),
        ("Weights", model.get("weights")),
        ("Weights SHA-256", model.get("weights_sha256")),
        ("Classes", model.get("num_classes")),
        ("Preprocess", ", ".join(f"{k}={json.dumps(v)}" for k, v in prep.items()) if prep else None),
        ("Created", manifest.get("created")),
        ("vitlens", manifest.get("vitlens_version")),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts if v not in (None, ""))
    method_items = "".join(
        f"<li><code>{esc(m)}</code> <span class=\"params\">"
        f"{esc(json.dumps(method_params.get(m) or {}, sort_keys=True, default=str))}</span></li>"
        for m in methods
    )
    count_text = (
        f"{counts['images']} images: {counts['ok']} explained, {counts['failed']} failed; "
        f"{counts['rows']} gallery rows, {counts['overlays']} overlays"
    )
    return (
        f"<header><h1>{esc(title)}</h1><dl class=\"facts\">{dl}</dl>"
        f"<h2>Methods ({len(methods)})</h2><ul class=\"methods\">{method_items or '<li>none</li>'}</ul>"
        f"<p class=\"counts\" id=\"counts\">{esc(count_text)}</p></header>"
    )


def _gallery_html(rows: list[_Row], methods: list[str]) -> str:
    if not rows:
        return ('<section id="gallery"><h2>Gallery</h2>'
                '<p class="empty">No image was explained successfully.</p></section>')
    classes = sorted({r.pred_name for r in rows if r.pred_name}, key=str.casefold)
    options = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in classes)
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    body = []
    for r in rows:
        mark = ""
        if r.correct is not None:
            mark = ' <span class="ok">✓</span>' if r.correct else ' <span class="bad">✗</span>'
        info = (
            f'<div class="fname" title="{esc(r.path)}">{esc(r.file_name)}</div>'
            f"<div><span class=\"k\">label</span> {esc(r.label)}</div>"
            f"<div><span class=\"k\">pred</span> {esc(r.prediction)}{mark}</div>"
            f"<div><span class=\"k\">target</span> {esc(r.target)}</div>"
        )
        cells = "".join(
            f"<td>{_img(c)}</td>" if c else '<td><span class="na">n/a</span></td>'
            for c in (r.methods[m] for m in methods)
        )
        body.append(
            f'<tr class="item" data-pred="{esc(r.pred_name)}" data-key="{esc(r.key)}">'
            f'<td class="info">{info}</td><td>{_img(r.original)}</td>{cells}</tr>'
        )
    return (
        '<section id="gallery"><h2>Gallery</h2>'
        '<div class="controls"><label for="class-filter">Predicted class</label> '
        f'<select id="class-filter"><option value="">all</option>{options}</select> '
        f'<span id="shown-count">{len(rows)} of {len(rows)} rows</span></div>'
        '<div class="scroll"><table class="gallery"><thead><tr><th>image</th><th>original</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )


def _warnings_html(manifest: dict) -> str:
    """The run's warnings about maps that show nothing (constant, all zero, not finite), above the gallery."""
    lines = [str(line) for line in manifest.get("warnings") or []]
    if not lines:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return (f'<section id="warnings" class="warnings"><h2>Maps that show nothing ({len(lines)})</h2>'
            f"<ul>{items}</ul></section>")


def _failed_html(images: list[dict]) -> str:
    failed = [im for im in images if im.get("status") != "ok"]
    if not failed:
        return ""
    items = "".join(
        f"<li><code>{esc(im.get('path') or im.get('key'))}</code> "
        f"<span class=\"status\">[{esc(im.get('status') or 'unknown')}]</span> "
        f"<span class=\"error\">{esc(im.get('error') or 'no error message')}</span></li>"
        for im in failed
    )
    return f'<section id="failed"><h2>Failed inputs ({len(failed)})</h2><ul>{items}</ul></section>'


def _metric_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_html(metrics: Any) -> str:
    if not isinstance(metrics, dict) or not metrics.get("columns"):
        return ""
    head = "".join(f"<th>{esc(c)}</th>" for c in metrics["columns"])
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_metric_value(v))}</td>" for v in row) + "</tr>"
        for row in metrics.get("rows") or []
        if isinstance(row, (list, tuple))
    )
    return (
        '<section id="metrics"><h2>Metrics</h2><table class="metrics">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


# adjacent literals keep the source lines short; the style sheet text is one unbroken string
_CSS = ("""
:root{--fg:#1d2330;--muted:#667085;--line:#d9dee7;--bg:#f6f7f9;--accent:#2f5bea}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;"""
        """color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:28px 0 10px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}
dt{color:var(--muted)}dd{margin:0;word-break:break-all}
ul.methods{margin:0;padding-left:20px}.params{color:var(--muted);font-family:ui-monospace,monospace;font-size:12px}
.counts{font-weight:600}
.controls{margin:0 0 10px;display:flex;gap:8px;align-items:center}
select{font:inherit;padding:3px 6px}#shown-count{color:var(--muted)}
.scroll{overflow-x:auto;background:#fff;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse}
table.gallery th,table.gallery td{padding:6px;border-bottom:1px solid var(--line);"""
        """vertical-align:middle;text-align:center}
table.gallery thead th{position:sticky;top:0;background:#fff;font-weight:600}
td.info{text-align:left!important;min-width:220px;max-width:320px;font-size:13px}
.fname{font-weight:600;word-break:break-all}.k{display:inline-block;width:44px;color:var(--muted)}
.ok{color:#138a36;font-weight:700}.bad{color:#c4320a;font-weight:700}
img.cell{display:block;width:150px;height:150px;object-fit:contain;cursor:zoom-in;border-radius:3px;background:#eef0f3}
img.cell:focus{outline:2px solid var(--accent)}
.warnings{border-left:4px solid #d08700;background:#fff8e6;padding:4px 12px;margin:8px 0}
.na{display:inline-block;width:150px;line-height:150px;color:var(--muted);background:#eef0f3;border-radius:3px}
#failed ul{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 10px 10px 28px}
.error{color:#c4320a}.status{color:var(--muted)}
table.metrics{background:#fff;border:1px solid var(--line)}
table.metrics th,table.metrics td{padding:5px 12px;border-bottom:1px solid var(--line);text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
.empty{color:var(--muted)}
[hidden]{display:none!important}
.lightbox{position:fixed;inset:0;background:rgba(10,12,16,.86);display:flex;align-items:center;justify-content:center;z-index:10;cursor:zoom-out}
.lightbox figure{margin:0;text-align:center}
/* A fixed box with object-fit scales small images (32 px CIFAR inputs) up as well as big ones down. */
.lightbox img{display:block;width:92vw;height:84vh;object-fit:contain}
.lightbox figcaption{color:#eee;margin-top:8px;font-size:13px}
""")

_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("vitlens-data").textContent);
  var select = document.getElementById("class-filter");
  var shown = document.getElementById("shown-count");
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.item"));
  function applyFilter() {
    var wanted = select ? select.value : "";
    var visible = 0;
    rows.forEach(function (row) {
      var show = wanted === "" || row.getAttribute("data-pred") === wanted;
      row.hidden = !show;
      if (show) { visible += 1; }
    });
    if (shown) { shown.textContent = visible + " of " + data.counts.rows + " rows"; }
  }
  if (select) { select.addEventListener("change", applyFilter); applyFilter(); }

  var box = document.getElementById("lightbox");
  var big = document.getElementById("lightbox-img");
  var caption = document.getElementById("lightbox-caption");
  var opener = null;
  function open(img) {
    opener = img;
    big.src = img.currentSrc || img.src;
    big.alt = img.alt;
    caption.textContent = img.getAttribute("data-caption") || "";
    box.hidden = false;
  }
  function close() {
    if (box.hidden) { return; }
    box.hidden = true;
    big.removeAttribute("src");
    if (opener) { opener.focus(); opener = null; }
  }
  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target.classList && target.classList.contains("cell")) { open(target); }
  });
  box.addEventListener("click", close);
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { close(); return; }
    var target = event.target;
    if (event.key === "Enter" && target.classList && target.classList.contains("cell")) { open(target); }
  });
})();
"""


def render_report(manifest: dict, title: str | None = None) -> str:
    """Build the report HTML for a parsed manifest (see :func:`write_report`)."""
    images = _images(manifest)
    methods = _method_names(manifest)
    rows = [row for im in images if im.get("status") == "ok" for row in _rows_for_image(im, methods)]
    counts = {
        "images": len(images),
        "ok": sum(1 for im in images if im.get("status") == "ok"),
        "failed": sum(1 for im in images if im.get("status") != "ok"),
        "rows": len(rows),
        "overlays": sum(1 for r in rows for c in r.methods.values() if c is not None),
    }
    spec = (manifest.get("model") or {}).get("spec")
    if title is None:
        title = f"vitlens report — {spec}" if spec else "vitlens report"
    summary = {"model": spec, "methods": methods, "counts": counts}
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"{_header_html(manifest, methods, counts, title)}{_warnings_html(manifest)}"
        f"{_gallery_html(rows, methods)}{_failed_html(images)}{_metrics_html(manifest.get('metrics'))}"
        '<div id="lightbox" class="lightbox" role="dialog" aria-modal="true" aria-label="Enlarged image" hidden>'
        '<figure><img id="lightbox-img" alt=""><figcaption id="lightbox-caption"></figcaption></figure></div>'
        f'<script type="application/json" id="vitlens-data">{json_for_script(summary)}</script>'
        f"<script>{_JS}</script></body></html>\n"
    )


def load_manifest(run_dir: str | os.PathLike) -> dict:
    """Read ``run_dir/manifest.json``.

    Raises
    ------
    InputError
        Missing, unreadable or malformed manifest (one-line message).
    """
    path = Path(run_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no {MANIFEST_NAME} in run directory '{run_dir}'") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())
        raise InputError(f"cannot read '{path}': {reason}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"'{path}' is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"'{path}' must contain a JSON object")
    return manifest


def write_report(run_dir: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``run_dir/report.html``, one self-contained static page, from ``run_dir/manifest.json``.

    The page has inline CSS and JS only (no network, works from ``file://``) and shows: the
    model spec, methods and counts; a gallery; failed inputs with their errors; and a metrics
    table when the manifest has ``"metrics"``. A ``<select id="class-filter">`` filters the
    gallery by predicted class name (``data-pred`` attributes); clicking (or Enter on) any
    thumbnail opens it enlarged in ``#lightbox``, which Escape or a click closes.

    Gallery layout, so the number of images is predictable: one ``<tr class="item">`` per
    (image with ``status == "ok"``, target) pair, an ok image without targets giving one row.
    Each row has one ``<img class="cell">`` for the original plus one per method that has an
    overlay for that (image, target); a missing overlay is a ``<span class="na">`` instead.
    With complete outputs, the number of ``img.cell`` is therefore
    ``sum over ok images of len(targets) * (1 + len(methods))``.

    Parameters
    ----------
    run_dir : path-like
        Directory holding ``manifest.json`` and the images it references (relative paths).
    title : str, optional
        Page title; defaults to ``"vitlens report — <model spec>"``.

    Returns
    -------
    Path
        The written ``report.html``.

    Raises
    ------
    InputError
        Missing or malformed manifest.
    OutputError
        The report cannot be written.
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    return write_text_atomic(run_dir / REPORT_NAME, render_report(manifest, title=title))
