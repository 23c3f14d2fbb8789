"""Self-contained HTML for text: the interactive head view and coloured tokens.

Both pages open straight from disk (no network, no external script or style), and nothing that
came from the input can run: tokens, texts and labels are HTML-escaped where they appear in
markup, and the one JSON blob in a ``<script>`` element is written with ``<``, ``>`` and ``&``
escaped (:func:`vitlens.render.report.json_for_script`); the page's own script puts tokens into
the document with ``textContent`` only.

Head view: two columns of the same tokens; hover a token on the left to draw its attention to the
tokens on the right (one colour per head, line opacity = weight), hover one on the right to see
who attends to it. A layer selector and one toggle per head. To keep 512-token pages small, each
query row keeps its weights >= 0.5 % (at most ``MAX_LINKS`` per row), stored as flat
``[key, per mille, key, per mille, ...]`` lists. Without a hovered token, links of weight >= 10 %
are drawn.
"""

from __future__ import annotations

import numpy as np

from vitlens.render.report import esc, json_for_script
from vitlens.text.views import token_colours

MAX_LINKS = 48
MIN_WEIGHT = 0.005
HEAD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


def _sparse_rows(attention: np.ndarray) -> list:
    """(L, H, n, n) -> [layer][head][query] = [key, per mille, key, per mille, ...] of the strongest keys
    (weights >= ``MIN_WEIGHT``, at most ``MAX_LINKS`` per row)."""
    a = np.asarray(attention, dtype=np.float32)
    n = a.shape[-1]
    k = min(MAX_LINKS, n)
    top = np.argpartition(-a, k - 1, axis=-1)[..., :k] if k < n else np.broadcast_to(np.arange(n), a.shape)
    top = np.sort(top, axis=-1)
    weights = np.rint(np.take_along_axis(a, top, axis=-1) * 1000).astype(np.int64)
    keep = np.take_along_axis(a, top, axis=-1) >= MIN_WEIGHT
    pairs = np.stack([top, weights], axis=-1)  # (L, H, n, k, 2)
    out = []
    for l in range(a.shape[0]):
        heads = []
        for h in range(a.shape[1]):
            heads.append([pairs[l, h, q][keep[l, h, q]].ravel().tolist() for q in range(n)])
        out.append(heads)
    return out


_HEAD_VIEW_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.2em; } .meta { color: #555; font-size: 0.9em; }
.controls { margin: 0.8em 0; display: flex; flex-wrap: wrap; gap: 0.6em; align-items: center; }
.head { display: inline-block; padding: 0.1em 0.45em; border-radius: 3px; color: white; cursor: pointer;
        font-size: 0.8em; user-select: none; }
.head.off { opacity: 0.25; }
#view { position: relative; }
svg text { font-size: 12px; cursor: default; }
svg text.special { fill: #888; }
svg text.active { font-weight: bold; }
.note { color: #777; font-size: 0.8em; }
"""

# adjacent raw literals keep the source lines short; the script text is one unbroken string
_HEAD_VIEW_JS = (r"""
(function () {
  var DATA = JSON.parse(document.getElementById('vitlens-data').textContent);
  var COLOURS = DATA.colours, ROW = 18, LEFT = 20, GAP = 260;
  var state = { seq: 0, layer: DATA.layer, heads: {}, hover: null };
  var svgNS = 'http://www.w3.org/2000/svg';
  var seqSelect = document.getElementById('seq'), layerSelect = document.getElementById('layer');
  var headBox = document.getElementById('heads'), view = document.getElementById('view');
  function option(sel, value, text) { var o = document.createElement('option'); o.value = value; """
                 r"""o.textContent = text; sel.appendChild(o); }
  DATA.sequences.forEach(function (s, i) { option(seqSelect, i, s.title); });
  if (DATA.sequences.length < 2) { seqSelect.parentNode.style.display = 'none'; }
  for (var l = 0; l < DATA.layers; l++) { option(layerSelect, l, 'layer ' + l); }
  layerSelect.value = state.layer;
  for (var h = 0; h < DATA.heads; h++) {
    state.heads[h] = true;
    var b = document.createElement('span'); b.className = 'head'; b.textContent = 'head ' + h;
    b.style.background = COLOURS[h % COLOURS.length]; b.dataset.head = h;
    b.addEventListener('click', function (e) { var k = +e.target.dataset.head; state.heads[k] = !state.heads[k];
      e.target.classList.toggle('off', !state.heads[k]); draw(); });
    b.addEventListener('dblclick', function (e) { var k = +e.target.dataset.head;
      for (var j = 0; j < DATA.heads; j++) { state.heads[j] = (j === k); }
      Array.prototype.forEach.call(headBox.children, function (c) { """
                 r"""c.classList.toggle('off', +c.dataset.head !== k); }); draw(); });
    headBox.appendChild(b);
  }
  seqSelect.addEventListener('change', function () { state.seq = +seqSelect.value; state.hover = null; build(); });
  layerSelect.addEventListener('change', function () { state.layer = +layerSelect.value; draw(); });
  var svg, lines, leftTexts, rightTexts;
  function el(name, attrs) { var e = document.createElementNS(svgNS, name); """
                 r"""for (var k in attrs) { e.setAttribute(k, attrs[k]); } return e; }
  function build() {
    view.textContent = '';
    var seq = DATA.sequences[state.seq], n = seq.tokens.length;
    svg = el('svg', { width: LEFT * 2 + GAP + 320, height: n * ROW + 20, id: 'attention-svg' });
    lines = el('g', { id: 'lines' }); svg.appendChild(lines);
    leftTexts = []; rightTexts = [];
    for (var i = 0; i < n; i++) {
      var t = el('text', { x: LEFT + 140, y: 14 + i * ROW, 'text-anchor': 'end', """
                 r"""'class': seq.special[i] ? 'left special' : 'left' });
      t.textContent = seq.tokens[i]; t.dataset.index = i;
      t.addEventListener('mouseenter', function (e) { """
                 r"""state.hover = { side: 'left', index: +e.target.dataset.index }; draw(); });
      svg.appendChild(t); leftTexts.push(t);
      var r = el('text', { x: LEFT + 150 + GAP, y: 14 + i * ROW, 'class': seq.special[i] ? 'right special' : 'right' });
      r.textContent = seq.tokens[i]; r.dataset.index = i;
      r.addEventListener('mouseenter', function (e) { """
                 r"""state.hover = { side: 'right', index: +e.target.dataset.index }; draw(); });
      svg.appendChild(r); rightTexts.push(r);
    }
    svg.addEventListener('mouseleave', function () { state.hover = null; draw(); });
    view.appendChild(svg);
    draw();
  }
  function link(q, k, w, colour) {
    lines.appendChild(el('line', { x1: LEFT + 145, y1: 10 + q * ROW, x2: LEFT + 145 + GAP, y2: 10 + k * ROW,
      stroke: colour, 'stroke-width': 2, 'stroke-opacity': Math.min(1, w / 1000) }));
  }
  function draw() {
    if (!lines) { return; }
    lines.textContent = '';
    leftTexts.forEach(function (t) { t.classList.remove('active'); });
    rightTexts.forEach(function (t) { t.classList.remove('active'); });
    var rows = DATA.sequences[state.seq].weights[state.layer], hover = state.hover;
    for (var h = 0; h < DATA.heads; h++) {
      if (!state.heads[h]) { continue; }
      var colour = COLOURS[h % COLOURS.length], head = rows[h];
      for (var q = 0; q < head.length; q++) {
        if (hover && hover.side === 'left' && hover.index !== q) { continue; }
        var row = head[q];
        for (var p = 0; p < row.length; p += 2) {
          var key = row[p], weight = row[p + 1];
          if (hover && hover.side === 'right' && hover.index !== key) { continue; }
          if (!hover && weight < 100) { continue; }
          link(q, key, weight, colour);
        }
      }
    }
    if (hover) { (hover.side === 'left' ? leftTexts : rightTexts)[hover.index].classList.add('active'); }
    document.getElementById('count').textContent = lines.childNodes.length;
  }
  build();
})();
""")


def head_view_html(sequences: list, title: str = "vitlens head view", layer: int = -1, meta: str = "") -> str:
    """The interactive head view page.

    Parameters
    ----------
    sequences : list of dict
        ``{"title": str, "tokens": [str], "special": [bool], "attention": array (L, H, n, n)}``.
    layer : int
        The layer shown first (negative counts from the end).
    """
    if not sequences:
        raise ValueError("no sequences to show")
    layers, heads = np.asarray(sequences[0]["attention"]).shape[:2]
    data = {
        "layers": int(layers), "heads": int(heads), "layer": int(layer) % int(layers),
        "colours": list(HEAD_COLOURS),
        "sequences": [{"title": str(s["title"]), "tokens": [str(t) for t in s["tokens"]],
                       "special": [bool(v) for v in s["special"]], "weights": _sparse_rows(s["attention"])}
                      for s in sequences],
    }
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_HEAD_VIEW_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(meta)}</p>
<div class="controls">
  <label>sequence <select id="seq"></select></label>
  <label>layer <select id="layer"></select></label>
  <span id="heads"></span>
</div>
<p class="note">Hover a token on the left: where it attends (one colour per head, opacity = weight).
Hover one on the right: which tokens attend to it. Click a head to toggle it, double-click to show it alone.
Lines: <span id="count">0</span>. Weights below {MIN_WEIGHT:.1%} are not stored.</p>
<div id="view"></div>
<script type="application/json" id="vitlens-data">{json_for_script(data)}</script>
<script>{_HEAD_VIEW_JS}</script>
</body></html>
"""


_TOKENS_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 70em; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin: 1.4em 0 0.3em; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; } td { padding: 0.25em 0.6em; vertical-align: top; }
td.method { font-family: monospace; white-space: nowrap; color: #444; }
.tok { padding: 0.05em 0.12em; border-radius: 2px; line-height: 1.9; }
.tok.special { color: #999; background: #f0f0f0; font-size: 0.85em; }
"""


def _hex(colour) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in colour)


def tokens_row_html(tokens, space, values, special, raw=None, signed: bool = False) -> str:
    """One line of coloured tokens (values already scaled to [0, 1], or [-1, 1] when signed)."""
    colours = token_colours(values, signed)
    parts = []
    for i, (text, sp, colour, is_special) in enumerate(zip(tokens, space, colours, special)):
        tip = f"{raw[i]:.4g}" if raw is not None else f"{values[i]:.3f}"
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        if is_special:
            span = f'<span class="tok special" title="{esc(tip)}">{esc(text)}</span>'
        else:
            fg = "#fff" if luminance < 0.45 else "#000"
            span = (f'<span class="tok" style="background:{_hex(colour)};color:{fg}" title="{esc(tip)}">'
                    f'{esc(text)}</span>')
        parts.append((" " if sp and i else "") + span)
    return "".join(parts)


def tokens_page_html(sections: list, title: str = "vitlens token attributions", meta: str = "") -> str:
    """Coloured tokens of several items.

    ``sections``: ``{"heading": str, "caption": str, "rows": [{"label", "tokens", "space", "values",
    "raw", "special", "signed"}]}``.
    """
    body = []
    for section in sections:
        body.append(f"<h2>{esc(section['heading'])}</h2>")
        if section.get("caption"):
            body.append(f'<p class="meta">{esc(section["caption"])}</p>')
        body.append("<table>")
        for row in section["rows"]:
            cells = tokens_row_html(row["tokens"], row["space"], row["values"], row["special"], row.get("raw"),
                                    row.get("signed", False))
            body.append(f'<tr><td class="method">{esc(row["label"])}</td><td>{cells}</td></tr>')
        body.append("</table>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_TOKENS_CSS}</style></head>
<body><h1>{esc(title)}</h1><p class="meta">{esc(meta)}</p>
<p class="meta">Colour: each method's scores over the non-special tokens, scaled to its maximum (min-max when every
score is large, e.g. rollout's residual share). Grey: special tokens. Hover a token for its raw score.</p>
{''.join(body)}
</body></html>
"""


__all__ = ["head_view_html", "tokens_page_html", "tokens_row_html"]
