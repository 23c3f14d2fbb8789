"""The Python face of vitlens for text: ``explain_text`` and ``attention_views``.

```python
from vitlens.text import explain_text, attention_views, load_text_model

model = load_text_model("vitlens:all-minilm-l6-v2")        # sentence-transformers MiniLM-L6, offline
result = explain_text(model, "A man is playing a guitar.", pairs="Someone plays an instrument.",
                      methods=["chefer", "legrad", "rollout"])
result.items[0].values                    # [0.667...]: the cosine similarity that was explained
result.items[0].sequences[0].scores       # {'chefer': (1, n) array, ...} one score per real token
result.save("out/")                       # tokens.html/.png, head view, attention views, statistics
attention_views(model, "The cat sat on the mat.", out="views/", views=["heads", "headview"])
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from vitlens.api import Prediction
from vitlens.cliargs import check_count, check_params_requested
from vitlens.errors import InputError, MethodError, OutputError
from vitlens.methods import check_baselines, check_params_for_model, get_method
from vitlens.render.atomic import ensure_dir, write_text_atomic
from vitlens.text.base import TextModel
from vitlens.text.batch import TextBatch
from vitlens.text.loading import load_text_model
from vitlens.text.task import parse_text_methods, resolve_objective, run_text_batch, text_params
from vitlens.text.stats import HeadStatistics
from vitlens.text.views import VIEWS, parse_views, write_stats
from vitlens.text.words import WordScores, check_aggregate, parse_spans, spans_view, words_view



@dataclass
class SequenceResult:
    """One token sequence the model read, and every method's score for each of its real tokens.

    Attributes
    ----------
    title : str
    tokens : list of str
        As the tokenizer names them (``[CLS]``, ``play``, ``##ing``, ``Ġplays`` ...).
    labels : list of str
        Readable labels for axes and the head view (``##`` marks a word continuation).
    display, space : list
        The text of each token for coloured-text rendering, and whether a space precedes it.
    special, cls, sep : list of bool
    scores : dict
        method -> (K, n) float array (K targets; raw, un-normalised).
    attention : ndarray or None
        (L, H, n, n) attention of the real tokens.
    ids : list of int or None
        The real tokens' ids.
    word_ids, offsets : list or None
        Per real token: its word's index (None for special tokens) and its (start, end) character range
        in its text (None without a fast tokenizer's offsets).
    words : WordScores or None
        The scores aggregated to words (``word_aggregate``: sum or max), special tokens excluded.
    spans : WordScores or None
        The scores of the character spans asked for (``spans=``), on the first text's sequence.
    """

    title: str
    tokens: list
    labels: list
    display: list
    space: list
    special: list
    cls: list
    sep: list
    segments: list
    scores: dict = field(default_factory=dict)
    attention: np.ndarray | None = None
    #: token ids of the real tokens (for the induction statistic)
    ids: list | None = None
    word_ids: list | None = None
    offsets: list | None = None
    words: WordScores | None = None
    spans: WordScores | None = None

    def text(self) -> str:
        """The sequence as the model read it (non-special tokens, sub-words joined)."""
        parts = []
        for shown, space, special in zip(self.display, self.space, self.special):
            if special:
                continue
            if parts and space:
                parts.append(" ")
            parts.append(shown)
        return "".join(parts)

    def to_dict(self) -> dict:
        out = {"title": self.title, "tokens": self.tokens, "special": self.special,
               "scores": {m: np.round(v.astype(np.float64), 8).tolist() for m, v in self.scores.items()}}
        if self.words is not None:
            out["words"] = self.words.to_dict()
        if self.spans is not None:
            out["spans"] = self.spans.to_dict()
        return out


@dataclass
class TextItem:
    """One explained input: a text (and its pair), its sequences, and the explained values."""

    text: str
    pair: str | None
    sequences: list
    values: list
    value_name: str
    targets: list | None = None
    prediction: Prediction | None = None
    #: the contrast class (token) whose score is subtracted from each target's, or None
    contrast: Prediction | None = None

    def to_dict(self) -> dict:
        return {
            "text": self.text, "pair": self.pair, "explained": self.value_name,
            **({} if self.contrast is None else {"contrast": self.contrast.to_dict()}),
            "values": [round(float(v), 6) for v in self.values],
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "targets": None if self.targets is None else [t.to_dict() for t in self.targets],
            "sequences": [s.to_dict() for s in self.sequences],
        }


@dataclass
class TextResult:
    """Token attributions (and attention) for a list of texts."""

    model: TextModel
    methods: list
    params: dict
    items: list
    objective: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, method: str) -> list:
        """Per item, the first sequence's scores of ``method`` for the first target, (n,)."""
        return [item.sequences[0].scores[method][0] for item in self.items]

    def save(self, out, views="all", formats=("png", "svg"), layer: int = -1, query=None, head=None,
             scale: str = "auto") -> dict:
        """Write every item's views (one directory per item when there are several); ``head``, ``scale``:
        see :func:`write_item`."""
        views = parse_views(views)
        root = ensure_dir(out)
        written: dict = {}
        for i, item in enumerate(self.items):
            directory = root if len(self.items) == 1 else root / f"{i + 1:04d}"
            for view, paths in write_item(item, directory, views, self.methods, self.model, formats, layer,
                                          query, head, scale).items():
                written.setdefault(view, []).extend(paths)
        return written


def _as_list(values, what: str):
    if values is None:
        return None
    if isinstance(values, str):
        return [values]
    try:
        values = list(values)
    except TypeError:
        raise InputError(f"{what} must be a string or a list of strings, got a {type(values).__name__}") from None
    for v in values:
        if not isinstance(v, str):
            raise InputError(f"{what} must be strings, got a {type(v).__name__}")
    return values


def explain_text(model, texts, pairs=None, methods="all", target=None, objective=None, params: dict | None = None,
                 batch_size: int = 16, truncate: bool = False, keep_attentions: bool = True,
                 max_length: int | None = None, target_token=None, word_aggregate: str = "sum",
                 spans=None, contrast=None, continuation: str | None = None, generate: int | None = None,
                 position: int | None = None):
    """Token attributions (and the captured attention) for texts.

    Parameters
    ----------
    model : TextModel or spec
        See :func:`vitlens.text.load_text_model`.
    texts : str or list of str
    pairs : str or list of str, optional
        Second texts. A classifier reads each (text, pair) as one sequence pair ([CLS] a [SEP] b [SEP]);
        a plain encoder embeds them separately and explains their similarity.
    methods : 'all', list or comma-separated str
        Any of ``attention, rollout, gmar-l1, gmar-l2, gmar++, legrad, chefer, attnlrp, cp-lrp, saliency,
        input-x-gradient, integrated-gradients`` (``random`` as a baseline); an empty list captures attention
        only. The LRP methods default to ``lin_gamma=0`` for text (see docs/text.md).
    target : classifier target as in :func:`vitlens.explain` (None/'pred', index, label, 'topK', list).
        For a causal decoder the classes are the vocabulary: 'pred' is the most likely next token.
    target_token : str or list of str, optional
        Causal decoders: the next token to explain given by its text, spaces kept (``' Paris'``);
        one token, or one per text.
    objective : plain encoders: 'similarity' (cosine, the default with pairs), 'dot', or a callable of
        the pooled embeddings (``f(emb)`` or ``f(emb_a, emb_b)`` with pairs) giving one value per text.
    params : dict
        method -> parameter overrides.
    word_aggregate : {'sum', 'max'}
        How each sequence's ``words`` view (:class:`vitlens.text.words.WordScores`) combines the scores of
        a word's tokens (special tokens excluded).
    spans : str or list of (start, end), optional
        Character ranges [start, end) of each text (``'0:5,10:22'``): a ``spans`` view on the first
        text's sequence, its overlapping tokens aggregated the same way (needs a fast tokenizer).
    contrast : str, int or list, optional
        A contrastive target: explain score(target) - score(contrast). Causal decoders: the contrast token's
        text, spaces kept (``' London'``); classifiers: a class index or label; one, or one per text.
    continuation, generate, position : optional (causal decoders, one text)
        Explain every token of a continuation instead of one next token: its text, a number of tokens to
        generate greedily, or the position of a token inside the text; returns a
        :class:`vitlens.text.continuation.ContinuationResult` (see :func:`explain_continuation`).
        Encoder-decoders (T5, BART, Marian): one source text, its target given (``continuation``) or generated
        (``generate``, by default 20 tokens); returns a :class:`vitlens.text.seq2seq.Seq2SeqResult` (see
        :func:`vitlens.text.seq2seq.explain_seq2seq`).
    """
    model = model if isinstance(model, TextModel) else load_text_model(model)
    if getattr(model, "is_seq2seq", False):  # an encoder-decoder explains its target tokens
        from vitlens.text.seq2seq import explain_seq2seq

        texts = _as_list(texts, "texts")
        if not texts or len(texts) != 1 or pairs is not None:
            raise InputError("an encoder-decoder model is explained for one source text (no pair)")
        if target is not None or target_token is not None or position is not None:
            raise MethodError("an encoder-decoder's targets are its target tokens: give continuation= or generate=, "
                              "not target= / target_token= / position=")
        return explain_seq2seq(model, texts[0], continuation, generate, contrast, methods, params,
                               keep_attentions=keep_attentions, truncate=truncate)
    if continuation is not None or generate is not None or position is not None:
        from vitlens.text.continuation import explain_continuation

        texts = _as_list(texts, "texts")
        if not texts or len(texts) != 1 or pairs is not None:
            raise InputError("a continuation is explained for one text (no pair)")
        if target is not None or target_token is not None:
            raise MethodError("a continuation's targets are its own tokens: give no target= / target_token=")
        return explain_continuation(model, texts[0], continuation, generate, position, contrast, methods, params,
                                    keep_attentions=False)
    check_aggregate(word_aggregate)
    spans = parse_spans(spans) if spans is not None else None
    causal = getattr(model, "is_causal", False)
    texts = _as_list(texts, "texts")
    pairs = _as_list(pairs, "pairs")
    if causal and pairs is not None:
        raise InputError("a causal decoder reads one text (the prompt): --pair / pairs= are for encoders")
    if target_token is not None:
        if not causal:
            raise MethodError("target_token= (--target-token) is for causal decoders: a classifier takes target=")
        if target is not None:
            raise MethodError("give target= or target_token=, not both")
        if isinstance(target_token, str):
            target = model.token_id(target_token)
        else:
            target = [model.token_id(t) for t in target_token]
    if not texts:
        raise InputError("no text given")
    if pairs is not None and len(pairs) != len(texts):
        raise InputError(f"{len(pairs)} second texts for {len(texts)} texts: give one per text")
    check_count(batch_size, "batch_size")
    if max_length is not None:
        check_count(max_length, "max_length")
    names = parse_text_methods(methods) if methods not in (None, [], (), "") else []
    check_params_requested(params, names, option="params", among="the methods")
    params = params or {}
    resolved = {name: text_params(name, params.get(name)) for name in names}
    check_params_for_model(resolved, model.num_layers)  # layer indices beyond the model's depth
    check_baselines(resolved, model)
    contrast_ids = None if contrast is None else _contrast_ids(model, contrast, len(texts))
    if model.is_classifier:
        if objective is not None:
            raise MethodError("objective= is for plain encoders: a classifier explains its target logits")
        obj = None
    else:
        if target is not None:
            raise MethodError("target= is for classifiers: a plain encoder explains a scalar (objective=)")
        obj = resolve_objective(objective, pairs is not None)
        if names and obj is None:
            raise MethodError("a plain encoder has no class to explain: give a second text (pairs= / --pair) to "
                              "explain the similarity, or an objective")
    items = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        chunk_pairs = pairs[start:start + batch_size] if pairs is not None else None
        chunk_target = target[start:start + batch_size] if isinstance(target, (list, tuple)) else target
        separate = not model.is_classifier and chunk_pairs is not None
        batch = model.encode(chunk + chunk_pairs if separate else chunk, None if separate else chunk_pairs,
                             truncate=truncate, max_length=max_length)
        chunk_contrast = None if contrast_ids is None else contrast_ids[start:start + batch_size]
        result = run_text_batch(model, batch, resolved, chunk_target, obj, keep_attentions, chunk_contrast)
        chunk_items = _items(model, batch, result, chunk, chunk_pairs, separate, obj)
        for item, c, logits in zip(chunk_items, chunk_contrast or [], result.logits if contrast_ids else []):
            item.value_name += f" minus that of {model.class_name(c)} (contrast)"
            item.contrast = Prediction(c, model.class_name(c), float(torch.softmax(logits.float(), dim=-1)[c]))
        for item in chunk_items:
            _add_words(item, separate, word_aggregate, spans)
        items.extend(chunk_items)
    return TextResult(model, names, resolved, items, None if obj is None else obj.name)


def _contrast_ids(model, contrast, count: int) -> list:
    """One contrast class per text: a decoder's token by its text (spaces kept), a classifier's index or label."""
    if not model.is_classifier:
        raise MethodError("contrast= (--contrast) needs classes: a classifier or a causal decoder")
    values = list(contrast) if isinstance(contrast, (list, tuple)) else [contrast] * count
    if len(values) != count:
        raise InputError(f"{len(values)} contrasts for {count} texts: give one, or one per text")
    out = []
    for value in values:
        if getattr(model, "is_causal", False) and isinstance(value, str):
            out.append(model.token_id(value))
        elif isinstance(value, str):
            text = value.strip()
            out.append(model.check_class_index(int(text)) if text.lstrip("-").isdigit() else model.class_index(text))
        elif isinstance(value, int) and not isinstance(value, bool):
            out.append(model.check_class_index(value))
        else:
            raise InputError(f"cannot use {value!r} as a contrast: give a token's text, a class index or a label")
    return out


def _items(model, batch: TextBatch, result, texts, pairs, separate, objective) -> list:
    sequences = [_sequence(model, batch, s, result) for s in range(len(batch))]
    items = []
    count = len(texts)
    probs = None if result.logits is None else torch.softmax(result.logits.float(), dim=-1)
    for i in range(count):
        if separate:
            seqs = [sequences[i], sequences[count + i]]
            seqs[0].title, seqs[1].title = "text", "pair"
        else:
            seqs = [sequences[i]]
            seqs[0].title = "text + pair" if pairs is not None else "text"
        values = result.values[i].tolist() if result.values.numel() else []
        item = TextItem(texts[i], pairs[i] if pairs is not None else None, seqs, values,
                        getattr(model, "value_name", None) or
                        ("target logit" if model.is_classifier else (objective.name if objective else "none")))
        if probs is not None:
            top = int(probs[i].argmax())
            item.prediction = Prediction(top, model.class_name(top), float(probs[i, top]))
            item.targets = [Prediction(int(t), model.class_name(int(t)), float(probs[i, int(t)]))
                            for t in result.targets[i].tolist()]
        items.append(item)
    return items


def _add_words(item: TextItem, separate: bool, aggregate: str, spans) -> None:
    """Each sequence's words view, and the spans view on the first text's sequence."""
    for k, seq in enumerate(item.sequences):
        if separate:  # a plain encoder's pair: each sequence is one text
            texts = (item.text,) if k == 0 else (item.pair,)
        else:
            texts = (item.text,) if item.pair is None else (item.text, item.pair)
        seq.words = words_view(seq, texts, aggregate)
    if spans is not None:
        first = item.sequences[0]
        first.spans = spans_view(first, item.text, spans, aggregate)


def _sequence(model, batch: TextBatch, s: int, result) -> SequenceResult:
    tokens = batch.tokens[s]
    words = batch.words[s]
    display, space, labels = [], [], []
    tok = model.tokenizer
    for j, t in enumerate(tokens):
        continuation = j > 0 and words[j] is not None and words[j - 1] is not None and words[j] == words[j - 1]
        if batch.special[s][j]:
            text = t
        else:
            text = t
            if tok is not None:
                try:
                    text = tok.convert_tokens_to_string([t]).strip() or t
                except Exception:  # noqa: BLE001 - some tokenizers refuse single pieces; show the raw token
                    text = t
            if text.startswith("##"):
                text = text[2:] or text
        display.append(text)
        space.append(j > 0 and not continuation)
        labels.append(("##" + text) if continuation else text)
    scores = {name: torch.as_tensor(maps[s]).double().cpu().numpy() for name, maps in result.token_maps.items()}
    attention = result.attentions[s].numpy() if result.attentions is not None else None
    ids = batch.input_ids[s].index_select(0, batch.real_index(s)).tolist()
    return SequenceResult("text", list(tokens), labels, display, space, list(batch.special[s]), list(batch.cls[s]),
                          list(batch.sep[s]), list(batch.segments[s]) if batch.segments else [0] * len(tokens),
                          scores, attention, ids, list(words),
                          list(batch.offsets[s]) if batch.offsets else None)


# ----------------------------------------------------------------------------------------- writing
def resolve_query(sequence: SequenceResult, query) -> int:
    """A query token given by position (negative from the end) or by its text."""
    n = len(sequence.tokens)
    if isinstance(query, str) and query.strip().lstrip("-").isdigit():
        query = int(query.strip())
    if isinstance(query, int):
        if not -n <= query < n:
            raise InputError(f"query token {query} is out of range: the text has {n} tokens (0-{n - 1})")
        return query % n
    wanted = str(query).strip().lower()
    for j, (raw, shown) in enumerate(zip(sequence.tokens, sequence.display)):
        if wanted in (raw.lower(), shown.lower()):
            return j
    raise InputError(f"query token {query!r} is not in the text (tokens: {' '.join(sequence.display[:20])}...)")


def query_positions(item: "TextItem", query) -> list:
    """Per sequence of ``item``, the query token's position, or None where that sequence lacks it.

    A query given by text is looked for in every sequence (both texts of a plain encoder's pair); a
    position applies to every sequence long enough. None anywhere is fine; nowhere is a one-line
    :class:`InputError` naming the tokens of every sequence.
    """
    found = []
    for seq in item.sequences:
        try:
            found.append(resolve_query(seq, query))
        except InputError:
            found.append(None)
    if all(q is None for q in found):
        if len(item.sequences) == 1:
            resolve_query(item.sequences[0], query)  # its own message
        shown = " | ".join(" ".join(seq.display[:12]) + ("..." if len(seq.display) > 12 else "")
                           for seq in item.sequences)
        raise InputError(f"query token {query!r} is in neither text (tokens: {shown})")
    return found


def parse_head(head, num_layers: int, num_heads: int) -> tuple:
    """``'L.H'`` (or a (layer, head) pair) -> (layer, head), negative indices counted from the end."""
    if isinstance(head, str):
        parts = head.strip().split(".")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise InputError(f"--head {head!r}: give LAYER.HEAD, e.g. 2.5 (layer 2, head 5)")
        head = tuple(int(p) for p in parts)
    try:
        layer, index = (int(v) for v in head)
    except (TypeError, ValueError):
        raise InputError(f"head {head!r}: give (layer, head) or 'LAYER.HEAD'") from None
    if not -num_layers <= layer < num_layers or not -num_heads <= index < num_heads:
        raise InputError(f"head {layer}.{index} is out of range: the model has {num_layers} layers x {num_heads} "
                         f"heads (0.0 to {num_layers - 1}.{num_heads - 1})")
    return layer % num_layers, index % num_heads


def _resolve_layer(layer: int, layers: int) -> int:
    if not -layers <= layer < layers:
        raise InputError(f"layer {layer} is out of range: the model has {layers} layers (0-{layers - 1})")
    return layer % layers


def token_rows(item: TextItem, methods: list) -> list:
    """Rows for the coloured-token renderers: one per method, target and sequence."""
    from vitlens.text.views import scale_scores

    rows = []
    for method in methods:
        signed = bool(getattr(get_method(method), "signed", False))
        for seq in item.sequences:
            scores = seq.scores.get(method)
            if scores is None:
                continue
            for k in range(scores.shape[0]):
                label = method
                if item.targets and len(item.targets) > 1:
                    label += f" [{item.targets[k].name}]"
                if len(item.sequences) > 1:
                    label += f" ({seq.title})"
                rows.append({"label": label, "tokens": seq.display, "space": seq.space, "special": seq.special,
                             "values": scale_scores(scores[k], seq.special, signed), "raw": scores[k],
                             "signed": signed})
                for group in (seq.words, seq.spans):
                    if group is None or method not in group.scores or not len(group):
                        continue
                    values = group.scores[method][k]
                    plain = [False] * len(group)
                    rows.append({"label": f"{label}, {group.kind} ({group.aggregate})", "tokens": group.text,
                                 "space": group.space, "special": plain, "values": scale_scores(values, plain, signed),
                                 "raw": values, "signed": signed})
    return rows


def item_caption(item: TextItem) -> str:
    parts = []
    if item.prediction is not None:
        parts.append(f"prediction: {item.prediction.name} ({item.prediction.prob:.3f})")
        what = "log-probability" if "log-probability" in item.value_name else "logit"
        versus = ""
        if item.contrast is not None:
            what, versus = f"{what} difference", f" minus {item.contrast.name}"
        parts.append("explained: " + ", ".join(f"{t.name}{versus} ({what} {v:.3f})"
                                               for t, v in zip(item.targets, item.values)))
    elif item.values:
        parts.append(f"explained: {item.value_name} = {item.values[0]:.4f}")
    return "; ".join(parts)


def write_item(item: TextItem, out, views, methods, model: TextModel, formats=("png", "svg"), layer: int = -1,
               query=None, head=None, scale: str = "auto", query_required: bool = True) -> dict:
    """Write the requested views of one item into directory ``out``; returns view -> [paths].

    ``query`` (the query view's token): a position or a token's text, looked for in every sequence
    (the view is written for each sequence that has it; ``query_required=False`` skips an item that
    has it nowhere instead of refusing it); None means the token the model reads its output from (the
    first token of an encoder, the last one of a causal decoder). ``head`` (``'L.H'`` or (layer, head))
    adds one head's view, ``head-L{l}-H{h}[-sN]``; ``scale`` is the attention heatmaps' colour scale
    (:func:`vitlens.text.views.scale_attention`).
    """
    if query is None:
        query = -1 if getattr(model, "is_causal", False) else 0
    from vitlens.text import html as text_html
    from vitlens.text import views as text_views

    views = parse_views(views)
    # a layer, head or query token the item does not have is refused before the first file is written
    if "heads" in views or "headview" in views:
        _resolve_layer(layer, model.num_layers)
    text_views.resolve_scale(scale, 1)
    head = parse_head(head, model.num_layers, model.num_heads) if head is not None else None
    queries = [None] * len(item.sequences)
    if "query" in views:
        try:
            queries = query_positions(item, query)
        except InputError:
            if query_required:
                raise
    out = ensure_dir(out)
    written: dict = {}
    multi = len(item.sequences) > 1
    heading = item.text if item.pair is None else f"{item.text}  |  {item.pair}"
    meta = f"model: {model.info.spec} ({model.kind_name})"
    if "tokens" in views and methods:
        rows = token_rows(item, methods)
        page = text_html.tokens_page_html([{"heading": heading, "caption": item_caption(item), "rows": rows}],
                                          meta=meta)
        written["tokens"] = [write_text_atomic(out / "tokens.html", page)]
        fig = text_views.tokens_figure(rows, title=_shorten(heading, 90) + _explained_suffix(item))
        written["tokens"] += text_views.save_figure(fig, out / "tokens", formats)
        write_text_atomic(out / "attributions.json", json.dumps(
            {"model": model.describe(), "methods": methods, **item.to_dict()}, indent=1, ensure_ascii=False))
        written["tokens"].append(out / "attributions.json")
    needs_attention = [v for v in views if v != "tokens"]
    if needs_attention and any(seq.attention is None for seq in item.sequences):
        raise OutputError("attention views need the captured attention: explain with keep_attentions=True")
    for s, seq in enumerate(item.sequences):
        suffix = f"-s{s + 1}" if multi else ""
        if not multi and item.pair is not None:  # a classifier's pair: one sequence holds both texts
            name = f"'{_shorten(item.text, 40)}' | '{_shorten(item.pair, 40)}'"
        else:
            name = f"'{_shorten(item.text if s == 0 else item.pair or item.text, 60)}'"
        if "heads" in views:
            lay = _resolve_layer(layer, seq.attention.shape[0])
            fig = text_views.heads_figure(seq.attention[lay], seq.labels, lay,
                                          title=f"layer {lay}, every head: {name}", scale=scale)
            written.setdefault("heads", []).extend(text_views.save_figure(fig, out / f"heads-layer{lay}{suffix}",
                                                                          formats))
        if "overview" in views:
            fig = text_views.overview_figure(seq.attention, title=f"every layer (rows) and head (columns): {name}",
                                             scale=scale)
            written.setdefault("overview", []).extend(text_views.save_figure(fig, out / f"overview{suffix}", formats))
        if "query" in views and queries[s] is not None:
            q = queries[s]
            fig = text_views.query_figure(seq.attention, seq.labels, q)
            written.setdefault("query", []).extend(text_views.save_figure(fig, out / f"query-{q}{suffix}", formats))
        if head is not None:
            lay, h = head
            one = HeadStatistics().add(seq.attention[lay:lay + 1, h:h + 1], seq.special, seq.cls, seq.sep,
                                       seq.ids).result()
            shown = {k: float(one[k][0, 0]) for k in ("entropy_norm", "local", "previous", "global", "dilated",
                                                      "dilation")}
            fig = text_views.head_figure(seq.attention[lay, h], seq.labels, lay, h, scale=scale, stats=shown,
                                         title=f"layer {lay}, head {h}: {name}")
            written.setdefault("head", []).extend(text_views.save_figure(fig, out / f"head-L{lay}-H{h}{suffix}",
                                                                         formats))
    if "headview" in views:
        sequences = [{"title": f"{seq.title}: {_shorten(seq.text(), 60)}", "tokens": seq.labels,
                      "special": seq.special, "attention": seq.attention} for seq in item.sequences]
        page = text_html.head_view_html(sequences, title=f"head view: {_shorten(heading, 80)}", layer=layer,
                                        meta=meta)
        written["headview"] = [write_text_atomic(out / "head_view.html", page)]
    if "stats" in views:
        acc = HeadStatistics()
        for seq in item.sequences:
            acc.add(seq.attention, seq.special, seq.cls, seq.sep, seq.ids)
        written["stats"] = write_stats(acc, out, item.sequences, formats,
                                       title=f"attention statistics: {_shorten(heading, 70)}")
    return written


def _explained_suffix(item: TextItem) -> str:
    """What the token attributions explain, for a title: a decoder's next token(s) or a class."""
    if not item.targets:
        return ""
    what = "next token" if "next-token" in item.value_name else "class"
    return f" \u2192 {what} " + ", ".join(t.name for t in item.targets)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def attention_views(model, text: str, pair: str | None = None, out=".", views="all", methods="all", target=None,
                    objective=None, layer: int = -1, query=None, formats=("png", "svg"), truncate: bool = False,
                    params: dict | None = None, head=None, scale: str = "auto") -> dict:
    """Explain one text and write its views into ``out``; returns view -> [written paths].

    ``views``: any of tokens, heads, overview, query, headview, stats (or 'all'); ``head='L.H'`` adds
    one head's view, ``scale`` is the heatmaps' colour scale (see :func:`write_item`). The ``tokens``
    view (attributions) is left out for a plain encoder without ``pair`` or ``objective`` (it has
    nothing to explain); asking for it explicitly is an error.
    """
    model = model if isinstance(model, TextModel) else load_text_model(model)
    if getattr(model, "is_seq2seq", False):  # the source text; its target generated (views per attention kind)
        from vitlens.text.seq2seq import explain_seq2seq, parse_seq2seq_views

        asked = parse_seq2seq_views(views)
        result = explain_seq2seq(model, text, methods=methods if "tokens" in asked else [], params=params,
                                 truncate=truncate)
        return result.save(out, asked, formats, layer, scale)
    asked = parse_views(views)
    if "tokens" in asked and not model.is_classifier and pair is None and objective is None:
        if views not in (None, "all"):
            raise MethodError("token attributions of a plain encoder explain a scalar: give a second text (pair=) "
                              "or an objective")
        asked = [v for v in asked if v != "tokens"]
    methods = methods if "tokens" in asked else []
    result = explain_text(model, text, pairs=pair, methods=methods, target=target, objective=objective,
                          truncate=truncate, params=params)
    return write_item(result.items[0], out, asked, result.methods, model, formats, layer, query, head, scale)


__all__ = ["Prediction", "SequenceResult", "TextItem", "TextResult", "VIEWS", "attention_views", "explain_text",
           "parse_views", "write_item", "write_stats"]
