"""Encoder-decoder models: T5 / mT5, BART and Marian (Hugging Face ``...ForConditionalGeneration``, ``MarianMTModel``).

A :class:`Seq2SeqModel` reads a *source* text with its encoder and a *target* with its decoder (teacher forcing:
the decoder's input is the start token followed by the target without its last token). Its attention comes in
three kinds, all captured in one forward by the shared Hugging Face capture (:mod:`vitlens.models.hf_capture`:
every one of these models calls ``AttentionInterface``, T5 with its relative position bias as ``position_bias``):

* ``encoder``: the encoder's self-attention, (L_enc, H, S, S) over the source tokens;
* ``decoder``: the decoder's causal self-attention, (L_dec, H, T, T) over the decoder's input tokens;
* ``cross``: the decoder's cross-attention, (L_dec, H, T, S): target position (query) x source token (key).

They reach the recorder in call order: the encoder's layers, then per decoder layer its self-attention and its
cross-attention (:meth:`Seq2SeqModel.split`). Padding: sources and targets are right-padded; padded keys get zero
probability (the eager masks), so a padded batch gives each sequence's attention alone.

Attributions: step t of the target explains the score of target token y_t (its logit, or log-probability with
``score='logprob'``, minus a contrast token's with ``contrast``) at decoder position t, attributed to the *source*
tokens, with the encoder's input embeddings as the leaf. One forward serves every step (one target slot per step
of the engine's pass, as :mod:`vitlens.text.continuation` does for a causal decoder). Methods:

* ``saliency``, ``input-x-gradient`` (d y_t / d source embeddings, the shared pass's input gradient) and
  ``integrated-gradients`` (captum, interpolating the source embeddings; decoder inputs fixed);
* the attention methods see every attention call as one map on the *joint* tokens [decoder positions 0..t; source
  tokens] (zero outside its block: encoder self-attention source x source, decoder self-attention target x
  target, cross-attention target x source), read at row t on the source columns. ``layer`` / ``start_layer`` count
  the calls in order (the encoder's layers, then per decoder layer its self- and its cross-attention):
  ``attention`` (``layer=-1``) is then the last decoder layer's cross-attention of position t, mean over heads;
  ``chefer`` is Chefer et al.'s (ICCV 2021) rule R <- R + mean_h (G * A)^+ R over every call. Per block that is
  their self-attention rules (eq. 6-7: R^kk += A R^kk for the encoder, R^qq += A R^qq and R^qk += A R^qk for the
  decoder's self-attention) and, for cross-attention, R^qk += A R^kk: their bi-modal rule (eq. 10) without its
  normalisation of the self-relevances and without the (R^qq)^T factor (the decoder's later self-attention
  layers carry R^qk along through R^qk += A R^qk instead).

Rollout, GMAR and LeGrad (row-normalised residuals, per-layer readouts of one token sequence) and the LRP rules (not
set up for cross-attention) are refused in one line (:data:`REFUSED`, the adapter's ``unsupported_methods``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from vitlens.engine import ExplainTask, run_task
from vitlens.errors import InputError, MethodError, ModelError, TargetError
from vitlens.methods import Captured, check_baselines, check_params_for_model, expand_methods, get_method
from vitlens.models.base import ModelInfo
from vitlens.models.registry import Family, register_family
from vitlens.render.atomic import ensure_dir, write_text_atomic
from vitlens.text.base import TextModel, unsupported_message
from vitlens.text.batch import TextBatch
from vitlens.text.decoders import SCORES, DecoderModel
from vitlens.text.task import TEXT_NEEDS, _sequence_channels, text_params

#: model class name -> architecture family
SEQ2SEQ_FAMILIES = {
    "T5ForConditionalGeneration": "t5",
    "MT5ForConditionalGeneration": "t5",
    "BartForConditionalGeneration": "bart",
    "MarianMTModel": "marian",
}
SUPPORTED_SEQ2SEQ = ("T5 / mT5 (T5ForConditionalGeneration, MT5ForConditionalGeneration), BART "
                     "(BartForConditionalGeneration), Marian (MarianMTModel)")
#: what ``all`` means for an encoder-decoder
SEQ2SEQ_METHODS = ("attention", "chefer", "saliency", "input-x-gradient", "integrated-gradients")
#: the attention kinds, in the order of the views
KINDS = ("encoder", "decoder", "cross")
#: the views an encoder-decoder run writes
SEQ2SEQ_VIEWS = ("tokens", "heads", "overview", "headview", "stats")
#: tokens generated when neither a continuation nor a number of tokens is given
DEFAULT_GENERATE = 20
_SELF = ("it combines the self-attention of one token sequence, and a target token reads the source through "
         "cross-attention: use attention (cross-attention), chefer, saliency, input-x-gradient or "
         "integrated-gradients")
_LRP = ("its LRP rules are not set up for cross-attention: use saliency, input-x-gradient or integrated-gradients "
        "for encoder-decoder models")
#: methods an encoder-decoder refuses, with the one-line reason
REFUSED = {"rollout": _SELF, "gmar-l1": _SELF, "gmar-l2": _SELF, "gmar++": _SELF, "legrad": _SELF,
           "attention-gradcam": _SELF, "attnlrp": _LRP, "cp-lrp": _LRP, "transformer-attribution": _LRP}
#: statistics of cross-attention heads (rows: target positions, columns: source tokens)
CROSS_STATS = ("entropy", "entropy_norm", "special", "global", "peak")


class Seq2SeqModel(TextModel):
    """A Hugging Face encoder-decoder (T5 / mT5, BART, Marian) with its tokenizer.

    Parameters
    ----------
    module : nn.Module
        One of the classes in :data:`SEQ2SEQ_FAMILIES`.
    tokenizer : transformers tokenizer, optional
    score : {'logit', 'logprob'}
        What a target token's step explains: its logit (default) or its log-probability.
    """

    family = "hf-seq2seq"
    is_seq2seq = True

    def __init__(self, module: nn.Module, tokenizer=None, score: str = "logit", info: ModelInfo | None = None):
        name = type(module).__name__
        if name not in SEQ2SEQ_FAMILIES:
            raise ModelError(unsupported_message(name))
        if score not in SCORES:
            raise ModelError(f"unknown score {score!r}: expected one of {', '.join(SCORES)}")
        encoder, decoder = module.get_encoder(), module.get_decoder()
        enc = list(encoder.block if hasattr(encoder, "block") else encoder.layers)
        dec = list(decoder.block if hasattr(decoder, "block") else decoder.layers)
        super().__init__(module, tokenizer, text_family=SEQ2SEQ_FAMILIES[name], backbone=module, layers=enc + dec,
                         is_classifier=True, info=info)
        self.encoder, self.decoder = encoder, decoder
        self.encoder_layers, self.decoder_layers = len(enc), len(dec)
        self.score = score
        self.pooling = "last"
        self.lm_head = module.get_output_embeddings()

    # --- facts ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Attention maps per forward: every encoder layer, and two per decoder layer (self, cross)."""
        return self.encoder_layers + 2 * self.decoder_layers

    @property
    def num_heads(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "num_heads", None) or getattr(cfg, "encoder_attention_heads", None)
                   or cfg.num_attention_heads)

    @property
    def num_classes(self) -> int:
        return int(self.lm_head.out_features)

    @property
    def value_name(self) -> str:
        return "target-token log-probability" if self.score == "logprob" else "target-token logit"

    @property
    def decoder_start_id(self) -> int:
        """The token the decoder starts from (T5: pad, BART: </s>, Marian: pad)."""
        for cfg in (getattr(self.module, "generation_config", None), self.config):
            value = getattr(cfg, "decoder_start_token_id", None)
            if value is not None:
                return int(value)
        if self.config.pad_token_id is not None:
            return int(self.config.pad_token_id)
        raise ModelError(f"{self.kind_name} has no decoder_start_token_id in its config")

    def layer_counts(self) -> dict:
        return {"encoder": self.encoder_layers, "decoder": self.decoder_layers, "cross": self.decoder_layers}

    def describe(self) -> dict:
        return {"spec": self.info.spec, "class": self.kind_name, "family": self.text_family, "kind": "encoder-decoder",
                "encoder_layers": self.encoder_layers, "decoder_layers": self.decoder_layers,
                "heads": self.num_heads, "score": self.score, "vocabulary": self.num_classes}

    def unsupported_methods(self) -> dict:
        return dict(REFUSED)

    # the vocabulary as classes: as a causal decoder's
    class_name = DecoderModel.class_name
    token_id = DecoderModel.token_id
    class_index = DecoderModel.class_index

    # --- tokenization -----------------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
               max_length: int | None = None) -> TextBatch:
        """Source texts -> a right-padded batch with the tokenizer's special tokens (T5 and Marian: a final </s>;
        BART: <s> ... </s>). ``truncate`` keeps the beginning of a long text."""
        texts = self.checked_texts(texts, pairs, single="an encoder-decoder model reads one source text")
        limit = min(max_length or self.max_length, self.max_length)
        tok = self.tokenizer
        special_ids = set(int(i) for i in (tok.all_special_ids or []))
        rows = []
        for i, text in enumerate(texts):
            ids = [int(t) for t in tok(text, add_special_tokens=True)["input_ids"]]
            if len(ids) > limit:
                if not truncate:
                    raise InputError(f"text {i + 1} has {len(ids)} tokens but the model takes at most {limit}: "
                                     "shorten it, or truncate (--truncate / truncate=True)")
                ids = ids[:limit - 1] + ids[-1:] if ids[-1] in special_ids else ids[:limit]
            rows.append(ids)
        return ids_batch(rows, tok.convert_ids_to_tokens, special_ids, self._pad_id()).to(self.device)

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        pad = pad if pad is not None else self.config.pad_token_id
        return int(pad) if pad is not None else 0

    # --- running it -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The encoder's input embeddings of the source ids (B, S, E), as the encoder computes them from ids
        (Marian's ``embed_scale`` applied; BART's scaled embedding scales itself), a detached leaf."""
        with torch.no_grad():
            embeds = self.encoder.embed_tokens(input_ids) * getattr(self.encoder, "embed_scale", 1.0)
        return embeds.detach()

    def forward(self, batch: "Seq2SeqBatch", embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (S, T, vocabulary) of every target position: logits or log-probabilities."""
        if embeds is None:
            embeds = self.embed(batch.source.input_ids)
        out = self.module(inputs_embeds=embeds, attention_mask=batch.source.attention_mask,
                          decoder_input_ids=batch.decoder_ids, decoder_attention_mask=batch.decoder_mask,
                          use_cache=False)
        logits = out.logits
        return torch.log_softmax(logits, dim=-1) if self.score == "logprob" else logits

    def split(self, attentions: list) -> dict:
        """The captured maps in call order -> {'encoder': [...], 'decoder': [...], 'cross': [...]} (per layer)."""
        le = self.encoder_layers
        if len(attentions) != self.num_layers:
            raise RuntimeError(f"captured {len(attentions)} attention maps for {self.num_layers}")
        return {"encoder": list(attentions[:le]), "decoder": list(attentions[le::2]),
                "cross": list(attentions[le + 1::2])}

    def readout_weights(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        weights[-1] = 1.0
        return weights


def ids_batch(rows: list, names, special_ids: set, pad: int) -> TextBatch:
    """Right-padded :class:`TextBatch` of id lists; ``names(ids)`` -> the tokens' names."""
    n = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    tokens, special = [], []
    for s, ids in enumerate(rows):
        input_ids[s, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[s, :len(ids)] = 1
        tokens.append(list(names(ids)))
        special.append([t in special_ids for t in ids])
    false = [[False] * len(r) for r in rows]
    words = [[None if sp else j for j, sp in enumerate(spec)] for spec in special]
    return TextBatch(input_ids, mask, None, tokens, special, [list(f) for f in false], [list(f) for f in false], words,
                     [[0] * len(r) for r in rows])


@dataclass
class Seq2SeqBatch:
    """Sources and targets of an encoder-decoder, both right-padded.

    Attributes
    ----------
    source : TextBatch
        The encoder's input.
    target : TextBatch
        The decoder's input: the start token, then the target without its last token.
    steps : LongTensor
        (S, T) the explained target tokens: ``steps[s, t]`` is read at decoder position t (padding: the pad id).
    """

    source: TextBatch
    target: TextBatch
    steps: torch.Tensor

    @property
    def decoder_ids(self) -> torch.Tensor:
        return self.target.input_ids

    @property
    def decoder_mask(self) -> torch.Tensor:
        return self.target.attention_mask

    def __len__(self) -> int:
        return len(self.source)

    def rows(self, rows: torch.Tensor) -> "Seq2SeqBatch":
        """The rows ``rows`` (ids and masks only), for re-scoring copies."""
        src, tgt = self.source, self.target
        return Seq2SeqBatch(TextBatch(src.input_ids[rows], src.attention_mask[rows], None, [], [], [], [], []),
                            TextBatch(tgt.input_ids[rows], tgt.attention_mask[rows], None, [], [], [], [], []),
                            self.steps[rows])


def make_batch(model: Seq2SeqModel, source: TextBatch, targets: list) -> Seq2SeqBatch:
    """A :class:`Seq2SeqBatch` of encoded sources and one target (a list of token ids) per source: the decoder
    reads the start token and the target without its last token (teacher forcing)."""
    if len(targets) != len(source):
        raise InputError(f"{len(targets)} targets for {len(source)} sources: give one per source")
    for i, target in enumerate(targets):
        if not len(target):
            raise InputError(f"target {i + 1} is empty: give at least one token")
    start = model.decoder_start_id
    tok = model.tokenizer
    special_ids = set(int(i) for i in (getattr(tok, "all_special_ids", None) or [])) | {start}
    names = tok.convert_ids_to_tokens if tok is not None else (lambda ids: [str(i) for i in ids])
    decoder_rows = [[start] + [int(t) for t in target[:-1]] for target in targets]
    target = ids_batch(decoder_rows, names, special_ids, model._pad_id()).to(source.input_ids.device)
    steps = torch.full_like(target.input_ids, model._pad_id())
    for s, ids in enumerate(targets):
        steps[s, :len(ids)] = torch.tensor([int(t) for t in ids], device=steps.device)
    return Seq2SeqBatch(source, target, steps)


class Seq2SeqTask(ExplainTask):
    """Sources (the leaf: the encoder's input embeddings) and teacher-forced targets; target slot t = step t.

    Each source is one view: its real tokens, read at decoder position t (the cross-attention rows 0..t of the
    ``attention`` method, readout one-hot at row t), the input gradient cut to its real source tokens.
    """

    # a view joins the encoder's, the decoder's and the cross-attention into one map: not a block of the batch
    reduces_in_backward = False

    def __init__(self, model: Seq2SeqModel, batch: Seq2SeqBatch, contrast: torch.Tensor | None = None,
                 keep_attentions: bool = True):
        self.model, self.batch = model, batch
        #: (S, T) tokens whose score is subtracted from each step's, or None
        self.contrast = contrast
        self.keep_attentions = keep_attentions
        self.num_views = len(batch)
        self.targets = batch.steps

    def leaf(self):
        return self.model.embed(self.batch.source.input_ids)

    def forward(self, leaf):
        return self.model.forward(self.batch, leaf)

    def _values(self, scores: torch.Tensor, steps: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
        values = scores.gather(2, steps[..., None])[..., 0]
        if contrast is not None:
            values = values - scores.gather(2, contrast[..., None])[..., 0]
        return values

    def scores(self, output, lrp=False):
        return self._values(output, self.batch.steps, self.contrast)

    def layer_score(self, hidden, pool, slot):
        raise MethodError(f"method 'legrad': {REFUSED['legrad']}")

    def views(self, captured, slot=0):
        out = []
        m = slot + 1  # decoder positions 0..t: the start token and the targets before y_t
        for s in range(len(self.batch)):
            src = self.batch.source.real_index(s)
            n = int(src.numel())
            attn = self._joint(captured.attentions, s, src, m)
            grads = None if captured.gradients is None else self._joint(captured.gradients, s, src, m)
            device, dtype = (attn[0].device, attn[0].dtype) if attn else (src.device, torch.float32)
            readout = torch.zeros(m + n, device=device, dtype=dtype)
            readout[slot] = 1.0  # row t of the joint map: decoder position t, where y_t is read
            ids = self.batch.source.input_ids[s].index_select(0, src).to(dtype).view(1, 1, 1, n)
            gradient = None
            if captured.input_gradient is not None:
                gradient = _sequence_channels(self.batch.source, s, *captured.input_gradient)
            out.append(Captured(attentions=attn, gradients=grads, readout=readout, num_prefix=m, grid=(1, n),
                                inputs=ids, input_gradient=gradient))
        return out

    def _joint(self, maps: list, s: int, src: torch.Tensor, m: int) -> list:
        """Per attention call, sequence ``s``'s map on the joint tokens [decoder positions 0..m-1; real source
        tokens], (1, H, m + n, m + n), zero outside its block: an encoder layer's self-attention in the source
        block, a decoder layer's self-attention in the target block, its cross-attention in the target-to-source
        block (queries = rows)."""
        le, out = self.model.encoder_layers, []
        for i, a in enumerate(maps or []):
            n = int(src.numel())
            block = a.new_zeros(1, a.shape[1], m + n, m + n)
            if i < le:
                block[..., m:, m:] = a[s:s + 1].index_select(-2, src).index_select(-1, src)
            elif (i - le) % 2 == 0:
                block[..., :m, :m] = a[s:s + 1, :, :m, :m]
            else:
                block[..., :m, m:] = a[s:s + 1, :, :m].index_select(-1, src)
            out.append(block)
        return out

    def lrp_views(self, leaf, grad, key, slot=0):
        raise MethodError(f"method '{key[0]}': {_LRP}")

    def input_views(self, leaf, values, slot=0):
        return [_sequence_channels(self.batch.source, s, leaf, values) for s in range(len(self.batch))]

    def score_rows(self, x, rows):
        sub = self.batch.rows(rows)
        contrast = None if self.contrast is None else self.contrast[rows]
        return self._values(self.model.forward(sub, x), sub.steps, contrast)

    def baselines(self):
        ids = self.batch.source.input_ids
        leaf = self.model.embed(ids)
        out = {"zero": torch.zeros((), device=leaf.device, dtype=leaf.dtype)}
        tok = self.model.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None:  # inseq's baseline: the unknown token at every position, end-of-sequence tokens kept
            eos = getattr(tok, "eos_token_id", None)
            base = torch.full_like(ids, int(unk))
            if eos is not None:
                base = torch.where(ids == eos, ids, base)
            out["unk"] = self.model.embed(base)
        return out


def parse_seq2seq_methods(methods, model: Seq2SeqModel | None = None) -> list:
    """'all' (= :data:`SEQ2SEQ_METHODS`), a comma-separated string or a list -> method names an encoder-decoder
    runs; the others are refused in one line (:data:`REFUSED`)."""
    refused = model.unsupported_methods() if model is not None else dict(REFUSED)

    def check(name, spec):
        if name in refused:
            raise MethodError(f"method '{name}': {refused[name]}")
        if not spec.needs <= TEXT_NEEDS:
            raise MethodError(f"method '{name}' is not available for text models (it needs "
                              f"{', '.join(sorted(spec.needs - TEXT_NEEDS))}); use {', '.join(SEQ2SEQ_METHODS)}")

    return expand_methods(methods, SEQ2SEQ_METHODS, check)


def capture_attentions(model: Seq2SeqModel, batch: Seq2SeqBatch) -> list:
    """Per sequence of ``batch``, ``{kind: (L, H, q, k) float32 array}`` of its real tokens: the encoder's
    self-attention (S x S), the decoder's self-attention (T x T) and the cross-attention (T x S)."""
    result = run_task(Seq2SeqTask(model, batch, keep_attentions=True), {})
    return [_sequence_attentions(model, batch, s, result.attentions) for s in range(len(batch))]


def _sequence_attentions(model, batch: Seq2SeqBatch, s: int, attentions: list) -> dict:
    src, tgt = batch.source.real_index(s), batch.target.real_index(s)
    keys = {"encoder": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)}
    out = {}
    for kind, maps in model.split(attentions).items():
        rows, cols = keys[kind]
        stacked = torch.stack([a[s] for a in maps])  # (L, H, q, k)
        out[kind] = stacked.index_select(-2, rows).index_select(-1, cols).float().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------ statistics
def cross_statistics(attention, source_special=None) -> dict:
    """Per-head statistics of cross-attention (L, H, T, S) (or (H, T, S)): rows are target positions, columns
    source tokens, every row sums to 1. Each is a mean over the T rows:

    * ``entropy``: H_i = -sum_j A_ij ln A_ij (nats); ``entropy_norm``: H_i / ln S (0 when S = 1)
    * ``special``: the mass on special source tokens (</s>, <s>, ...)
    * ``global``: max over source tokens j of the column mean (1/T) sum_i A_ij (1: every step reads one token)
    * ``peak``: the row's largest weight (1: each step reads one source token, an alignment-like head)
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise MethodError(f"cross-attention must be (L, H, T, S) or (H, T, S), got shape {tuple(a.shape)}")
    s = a.shape[-1]
    special = np.zeros(s, dtype=bool) if source_special is None else np.asarray(source_special, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    entropy = -plogp.sum(-1).mean(-1)
    return {"entropy": entropy, "entropy_norm": entropy / math.log(s) if s > 1 else np.zeros_like(entropy),
            "special": a[..., special].sum(-1).mean(-1), "global": a.mean(-2).max(-1), "peak": a.max(-1).mean(-1)}


# ------------------------------------------------------------------------------------------ the result
@dataclass
class Seq2SeqResult:
    """An encoder-decoder's target tokens attributed to its source tokens, and its three kinds of attention.

    Attributes
    ----------
    text : str
        The source text.
    source_tokens, source_labels, source_special : list
        The source's tokens (as the tokenizer names them, as text, special or not).
    target_tokens, target_labels, target_special : list
        The decoder's input tokens (start token + target without its last token): the rows of the decoder's
        self-attention and of the cross-attention.
    steps : list of dict
        Per step t: ``position`` (t), ``token``, ``id``, ``value`` (the explained score), ``logprob``, and
        ``contrast`` / ``contrast_id`` with a contrastive target.
    value_name : str
    sequence_logprob : float
        The target's score: the sum of its tokens' log-probabilities.
    matrices : dict
        method -> (S, T) array: row j = source token j, column t = step t, raw attribution.
    attentions : dict or None
        kind -> (L, H, q, k) array: ``encoder`` (S x S), ``decoder`` (T x T), ``cross`` (T x S).
    """

    text: str
    source_tokens: list
    source_labels: list
    source_special: list
    target_tokens: list
    target_labels: list
    target_special: list
    steps: list
    value_name: str
    sequence_logprob: float
    methods: list
    params: dict
    matrices: dict = field(default_factory=dict)
    attentions: dict | None = None
    generated: bool = False
    model_description: dict | None = None
    source_ids: list = field(default_factory=list)
    target_ids: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return "".join(step["token"] for step in self.steps)

    def to_dict(self) -> dict:
        return {"model": self.model_description, "source": self.text, "target": self.target,
                "generated": self.generated, "source_tokens": self.source_tokens, "source_labels": self.source_labels,
                "decoder_tokens": self.target_tokens, "explained": self.value_name, "steps": self.steps,
                "sequence_logprob": round(self.sequence_logprob, 8), "methods": self.methods, "params": self.params,
                "matrices": {m: np.round(a.astype(np.float64), 8).tolist() for m, a in self.matrices.items()}}

    def save(self, out, views="all", formats=("png", "svg"), layer: int = -1, scale: str = "auto") -> dict:
        """``seq2seq.json``; the attributions heatmap (``tokens``); per attention kind a folder (``encoder/``,
        ``decoder/``, ``cross/``) with ``heads-layerL`` (``heads``), ``overview``, ``head_view.html`` (``headview``,
        the self-attentions) and ``stats.csv`` / ``.json`` / figure (``stats``). Returns view -> [paths]."""
        from vitlens.text import views as text_views

        views = parse_seq2seq_views(views)
        text_views.resolve_scale(scale, 1)
        out = ensure_dir(out)
        written = {"tokens": [write_text_atomic(out / "seq2seq.json", json.dumps(self.to_dict(), indent=1,
                                                                                ensure_ascii=False))]}
        if "tokens" in views and self.matrices:
            written["tokens"] += attribution_figure(self, out / "attributions", formats)
        wanted = [v for v in views if v != "tokens"]
        if wanted and self.attentions is None:
            from vitlens.errors import OutputError

            raise OutputError("attention views need the captured attention: explain with keep_attentions=True")
        for kind in KINDS if wanted else ():
            written_kind = write_kind(self, kind, out / kind, wanted, formats, layer, scale)
            for view, paths in written_kind.items():
                written.setdefault(view, []).extend(paths)
        return written


def parse_seq2seq_views(views) -> list:
    """The views of an encoder-decoder run: 'all' = :data:`SEQ2SEQ_VIEWS`; ``query`` is refused in one line."""
    from vitlens.text.views import parse_views

    asked = parse_views(views)
    if views is None or views == "all":
        return list(SEQ2SEQ_VIEWS)
    other = [v for v in asked if v not in SEQ2SEQ_VIEWS]
    if other:
        raise InputError(f"view '{other[0]}' is not written for encoder-decoder models: use "
                         f"{', '.join(SEQ2SEQ_VIEWS)} or all")
    return asked


class _Sequence:
    """What :func:`vitlens.text.api.write_stats` reads of a sequence."""

    def __init__(self, tokens, special, ids=None):
        self.tokens, self.special, self.ids = tokens, special, ids
        self.cls = [False] * len(tokens)
        self.sep = [False] * len(tokens)


def write_kind(result: Seq2SeqResult, kind: str, out, views, formats, layer: int, scale: str) -> dict:
    """One attention kind's views into folder ``out``."""
    from vitlens.text import html as text_html
    from vitlens.text import views as text_views
    from vitlens.text.views import write_stats
    from vitlens.text.stats import HeadStatistics

    a = result.attentions[kind]
    layers = a.shape[0]
    if not -layers <= layer < layers:
        raise InputError(f"layer {layer} is out of range: the {kind} attention has {layers} layers (0-{layers - 1})")
    lay = layer % layers
    out = ensure_dir(out)
    rows = result.source_labels if kind == "encoder" else result.target_labels
    cols = result.target_labels if kind == "decoder" else result.source_labels
    what = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
            "cross": "cross-attention (target rows, source columns)"}[kind]
    written: dict = {}
    if "heads" in views:
        if kind == "cross":
            fig = cross_figure(a[lay][None], rows, cols, [f"head {h}" for h in range(a.shape[1])], scale,
                               f"layer {lay}, {what}")
        else:
            fig = text_views.heads_figure(a[lay], rows, lay, title=f"layer {lay}, {what}", scale=scale)
        written["heads"] = text_views.save_figure(fig, out / f"heads-layer{lay}", formats)
    if "overview" in views:
        if kind == "cross":
            fig = cross_figure(a, rows, cols, [f"H{h}" for h in range(a.shape[1])], scale,
                               f"{what}: every layer (rows) and head (columns)", labels=False)
        else:
            fig = text_views.overview_figure(a, title=f"{what}: every layer (rows) and head (columns)", scale=scale)
        written["overview"] = text_views.save_figure(fig, out / "overview", formats)
    if "headview" in views and kind != "cross":
        special = result.source_special if kind == "encoder" else result.target_special
        page = text_html.head_view_html([{"title": what, "tokens": rows, "special": special, "attention": a}],
                                        title=f"head view, {what}: {result.text[:80]}", layer=layer,
                                        meta=f"model: {(result.model_description or {}).get('spec', '')}")
        written["headview"] = [write_text_atomic(out / "head_view.html", page)]
    if "stats" in views:
        if kind == "cross":
            written["stats"] = write_cross_stats(a, result.source_special, out, formats,
                                                 f"{what} statistics: {result.text[:60]}")
        else:
            tokens = result.source_tokens if kind == "encoder" else result.target_tokens
            special = result.source_special if kind == "encoder" else result.target_special
            ids = result.source_ids if kind == "encoder" else result.target_ids
            acc = HeadStatistics().add(a, special, None, None, ids or None)
            written["stats"] = write_stats(acc, out, [_Sequence(tokens, special, ids)], formats,
                                           title=f"{what} statistics: {result.text[:60]}")
    return written


def write_cross_stats(attention, source_special, out, formats, title: str) -> list:
    """stats.csv (layer, head, :data:`CROSS_STATS`), stats.json and the figure of cross-attention heads."""
    from vitlens.text import views as text_views

    stats = cross_statistics(attention, source_special)
    layers, heads = stats["entropy"].shape
    rows = [{"layer": l, "head": h, **{k: float(stats[k][l, h]) for k in CROSS_STATS}}
            for l in range(layers) for h in range(heads)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["layer", "head", *CROSS_STATS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    paths = [write_text_atomic(out / "stats.csv", buffer.getvalue()),
             write_text_atomic(out / "stats.json", json.dumps({"kind": "cross", "rows": rows}, indent=1))]
    fig = text_views.stats_figure(stats, None, shown=CROSS_STATS, title=title)
    paths.extend(text_views.save_figure(fig, out / "stats", formats))
    return paths


def cross_figure(attention, rows, cols, head_titles, scale: str = "auto", title: str = "", labels: bool = True):
    """Cross-attention heatmaps (L, H, T, S): one panel per layer (rows) and head (columns), target positions
    down, source tokens across, each on the colour ``scale`` relative to its own maximum."""
    from vitlens.render.colors import get_cmap
    from vitlens.text import views as text_views

    a = np.asarray(attention, dtype=np.float32)
    layers, heads, t, s = a.shape
    cols_n = heads if layers > 1 else min(heads, 4)
    rows_n = layers if layers > 1 else math.ceil(heads / cols_n)
    cell_w = float(np.clip(0.16 * s + 1.2, 2.2, 6.0)) if labels else 1.2
    cell_h = float(np.clip(0.16 * t + 1.2, 2.2, 6.0)) if labels else 1.2 * max(t, 1) / max(s, 1) + 0.4
    fig = text_views._figure(cols_n * cell_w + 1.0, rows_n * cell_h + 0.8)
    cmap = get_cmap(text_views.ATTENTION_CMAP)
    for index in range(layers * heads):
        l, h = divmod(index, heads)
        ax = fig.add_subplot(rows_n, cols_n, index + 1)
        ax.imshow(text_views.scale_attention(a[l, h], scale), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                  interpolation="nearest")
        ax.set_title(head_titles[h] if layers == 1 else f"L{l} {head_titles[h]}", fontsize=8)
        if labels:
            last_row = index >= layers * heads - cols_n
            first_col = index % cols_n == 0
            ticks_s, ticks_t = text_views._tick_positions(s), text_views._tick_positions(t)
            ax.set_xticks(ticks_s if last_row else [])
            if last_row:
                ax.set_xticklabels([cols[k] for k in ticks_s], rotation=90, fontsize=7)
            ax.set_yticks(ticks_t if first_col else [])
            if first_col:
                ax.set_yticklabels([rows[k] for k in ticks_t], fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title} ({text_views.scale_caption(scale, s)})", fontsize=10)
    return fig


def attribution_figure(result: Seq2SeqResult, stem, formats=("png", "svg")) -> list:
    """One heatmap per method: source tokens (rows) x target steps (columns), each column divided by its largest
    absolute value; signed methods blue-white-red, the others white-to-red."""
    from vitlens.render.colors import get_cmap
    from vitlens.text import views as text_views

    names = list(result.matrices)
    rows, cols = result.matrices[names[0]].shape
    fig = text_views._figure(min(4 + 0.45 * cols * len(names), 40), min(2.2 + 0.28 * rows, 40))
    columns = [repr(step["token"])[1:-1] for step in result.steps]
    labels = [repr(t)[1:-1] for t in result.source_labels]
    for i, name in enumerate(names):
        matrix = result.matrices[name]
        scale = np.abs(matrix).max(axis=0, keepdims=True)
        shown = matrix / np.where(scale > 0, scale, 1)
        signed = bool(get_method(name).signed)
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.imshow(shown, cmap=get_cmap("bwr" if signed else "Reds"), vmin=-1 if signed else 0, vmax=1,
                  aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(cols))
        ax.set_xticklabels(columns, rotation=90, fontsize=7)
        step = max(1, rows // 64)
        ax.set_yticks(range(0, rows, step))
        ax.set_yticklabels(labels[::step], fontsize=7)
    fig.suptitle(f"{result.value_name} of each target token (columns) attributed to the source tokens (rows)",
                 fontsize=9)
    fig.subplots_adjust(bottom=0.25, wspace=0.6)
    return text_views.save_figure(fig, stem, formats)


# ------------------------------------------------------------------------------------------ the API
def greedy_target(model: Seq2SeqModel, source: TextBatch, count: int) -> list:
    """``count`` target tokens generated greedily (``generate(do_sample=False, num_beams=1)``; fewer when the
    model ends the target with its end-of-sequence token), without the decoder's start token."""
    with model.eval_mode(), torch.no_grad():
        out = model.module.generate(input_ids=source.input_ids, attention_mask=source.attention_mask,
                                    do_sample=False, num_beams=1, max_new_tokens=count, min_new_tokens=0,
                                    decoder_start_token_id=model.decoder_start_id)
    ids = [int(t) for t in out[0].tolist()]
    return ids[1:] if ids and ids[0] == model.decoder_start_id else ids


def _target_ids(model: Seq2SeqModel, text: str, what: str) -> list:
    if not isinstance(text, str) or not text:
        raise InputError(f"empty {what}: give at least one token")
    ids = [int(t) for t in model.tokenizer(text_target=text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InputError(f"empty {what}: give at least one token")
    return ids


def explain_seq2seq(model, text: str, continuation: str | None = None, generate: int | None = None,
                    contrast: str | None = None, methods="all", params: dict | None = None,
                    keep_attentions: bool = True, truncate: bool = False) -> Seq2SeqResult:
    """Attributions of every target token of an encoder-decoder to the source tokens, and its attention.

    Parameters
    ----------
    model : Seq2SeqModel
        A loaded encoder-decoder (:func:`~vitlens.text.loading.load_text_model`; `explain_text` takes specs).
    text : str
        The source text (tokenized with the tokenizer's special tokens, e.g. T5's final ``</s>``).
    continuation : str, optional
        The target, explained by teacher forcing (tokenized as a target, no special tokens added).
    generate : int, optional
        Generate that many target tokens greedily and explain them (default :data:`DEFAULT_GENERATE` when
        neither is given; stops early at the end-of-sequence token).
    contrast : str, optional
        A target of as many tokens: step t then explains score(y_t) - score(y'_t).
    methods, params
        :data:`SEQ2SEQ_METHODS` (``all``) or a subset; an empty list captures attention only.
    keep_attentions : bool
        Keep the three kinds of attention for the views (``Seq2SeqResult.attentions``).
    """
    from vitlens.cliargs import check_params_requested

    if not isinstance(model, TextModel):  # loading lives above this module (text.loading imports it)
        raise ModelError("explain_seq2seq takes a loaded model: load_text_model(spec) first, or explain_text(spec, "
                         "text) with the spec")
    if not getattr(model, "is_seq2seq", False):
        raise MethodError(f"explain_seq2seq explains encoder-decoder models ({SUPPORTED_SEQ2SEQ}), not "
                          f"{model.kind_name}")
    if model.tokenizer is None:
        raise InputError("this text model has no tokenizer: pass tokenizer= to load_text_model")
    if continuation is not None and generate is not None:
        raise InputError("give continuation= or generate= (--continuation or --generate), not both")
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty text: give at least one word to explain")
    names = parse_seq2seq_methods(methods, model) if methods not in (None, [], (), "") else []
    check_params_requested(params, names, option="params", among="the methods")
    resolved = {name: text_params(name, (params or {}).get(name)) for name in names}
    check_params_for_model(resolved, model.num_layers)  # layer / start_layer count the attention calls
    check_baselines(resolved, model)
    source = model.encode([text], truncate=truncate)
    generated = continuation is None
    if generated:
        count = DEFAULT_GENERATE if generate is None else generate
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"generate must be a number of tokens >= 1, got {count!r}")
        steps = greedy_target(model, source, count)
        if not steps:
            raise InputError("the model generated no target token")
    else:
        steps = _target_ids(model, continuation, "continuation")
    if len(steps) > model.max_length:
        raise InputError(f"the target has {len(steps)} tokens but the model takes at most {model.max_length}")
    contrast_ids = None
    if contrast is not None:
        contrast_ids = _target_ids(model, contrast, "contrast")
        if len(contrast_ids) != len(steps):
            raise TargetError(f"the contrast {contrast!r} is {len(contrast_ids)} token(s) but the target is "
                              f"{len(steps)}: give one contrast token per target token")
    batch = make_batch(model, source, [steps])
    device = model.device
    contrast_tensor = None if contrast_ids is None else torch.tensor([contrast_ids], device=device)
    result = run_task(Seq2SeqTask(model, batch, contrast_tensor, keep_attentions), resolved)
    logprobs = torch.log_softmax(result.output.float()[0], dim=-1)  # (T, V)
    step_logprobs = logprobs.gather(1, batch.steps[0][:, None])[:, 0]
    matrices = {}
    for name in names:
        matrices[name] = torch.stack([part.reshape(-1) for part in result.maps[name][0]], dim=1).double().cpu().numpy()
    tok = model.tokenizer
    rows = []
    for t, token_id in enumerate(steps):
        row = {"position": t, "token": tok.decode([token_id]), "id": token_id, "value": float(result.values[0, t]),
               "logprob": float(step_logprobs[t])}
        if contrast_ids is not None:
            row["contrast"] = tok.decode([contrast_ids[t]])
            row["contrast_id"] = contrast_ids[t]
        rows.append(row)
    value_name = model.value_name + (" difference (target - contrast)" if contrast_ids is not None else "")
    attentions = _sequence_attentions(model, batch, 0, result.attentions) if keep_attentions else None
    source_ids = batch.source.input_ids[0].tolist()
    target_ids = batch.decoder_ids[0].tolist()
    return Seq2SeqResult(text, batch.source.tokens[0], [tok.decode([i]) for i in source_ids], batch.source.special[0],
                         batch.target.tokens[0], [tok.decode([i]) for i in target_ids], batch.target.special[0],
                         rows, value_name, float(step_logprobs.sum()), names, resolved, matrices, attentions,
                         generated, model.describe(), source_ids, target_ids)


# ------------------------------------------------------------------------------------------ the family
def is_seq2seq_model(module) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ in SEQ2SEQ_FAMILIES and hasattr(module, "config")


def wrap(module, tokenizer=None, info=None, score=None, **options) -> Seq2SeqModel:
    return Seq2SeqModel(module, tokenizer, score or "logit", info=info)


register_family(Family("hf-seq2seq", "text", is_seq2seq_model, wrap, priority=25,
                       description=f"the encoder-decoders {SUPPORTED_SEQ2SEQ}"))

__all__ = ["CROSS_STATS", "DEFAULT_GENERATE", "KINDS", "REFUSED", "SEQ2SEQ_FAMILIES", "SEQ2SEQ_METHODS",
           "SEQ2SEQ_VIEWS", "Seq2SeqBatch", "Seq2SeqModel", "Seq2SeqResult", "Seq2SeqTask", "capture_attentions",
           "cross_statistics", "explain_seq2seq", "greedy_target", "make_batch", "parse_seq2seq_methods"]
