"""Token sequences as a task of the one engine (:func:`vitlens.engine.run_task`).

Per batch of (padded) sequences the engine runs its usual pass -- one forward with attention capture
from the word embeddings, per target at most one gradient of the summed target scores with respect to
every layer's attention, LeGrad's partial backwards, and one rule-modified pass per LRP rule set --
and this module says what is text-specific: where the gradient starts (the word embeddings), what is
explained, and how the captured batch is cut into per-sequence views.

Why per-sequence views: a method that saw the whole padded batch with one readout vector would be
wrong for text in two ways. (1) The gradient of a score with respect to an attention entry of a
*padded key* is not zero even though the entry is (it is the upstream gradient times that key's value
vector), so GMAR's head norms and LeGrad's query means would change with the amount of padding.
(2) A plain encoder reads its sentence embedding from the mean of each sequence's real tokens: the
readout differs per sequence. So every method runs on each sequence's real-token block of the
captured tensors (padding removed), with that sequence's own readout -- which makes a padded batch
give exactly the one-at-a-time result. The method functions are the registered image methods,
unchanged: a sequence of n tokens is a (1, n) "grid" with no prefix tokens.

Scores: a classifier explains target logits (``target`` as in the image API: None/'pred', an index,
a label name, 'topK', one per text); a plain encoder explains a scalar of its sentence embeddings,
by default the cosine similarity of each text with its pair (``objective``).

LRP (AttnLRP / CP-LRP): the relevance of a token is its embedding times the modified gradient, summed
over channels (padding excluded). A plain encoder's similarity is explained with the norms detached
and the dot product's relevance split equally between the two sentences (see :func:`lrp_objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vitlens.engine import ExplainTask, resolve_targets, run_task
from vitlens.errors import MethodError
from vitlens.lrp.rules import uniform_mul
from vitlens.methods import (ATTENTIONS, GRADIENTS, INPUT_GRADIENT, LAYER_GRADIENTS, LRP, PATH_GRADIENTS, Captured,
                             expand_methods, get_method)
from vitlens.text.base import TextModel
from vitlens.text.batch import TextBatch

#: what ``all`` means for text
TEXT_METHODS = ("attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "attnlrp")
#: captures the text engine can make
TEXT_NEEDS = frozenset({ATTENTIONS, GRADIENTS, LAYER_GRADIENTS, LRP, INPUT_GRADIENT, PATH_GRADIENTS})
#: text defaults that differ from the image ones: the plain gradient (LRP-0 / epsilon rule) on every
#: linear layer, as LXT explains language models; Gamma is the ViT setting (override with params)
#: saliency reduces a token's embedding gradient by its L2 norm, as inseq aggregates token attributions
TEXT_DEFAULTS = {"attnlrp": {"lin_gamma": 0.0}, "cp-lrp": {"lin_gamma": 0.0}, "saliency": {"reduce": "l2"}}


def text_params(name: str, overrides: dict | None = None) -> dict:
    """A method's resolved parameters for text: the registered defaults, the text defaults, overrides."""
    return get_method(name).params({**TEXT_DEFAULTS.get(name, {}), **(overrides or {})})


def parse_text_methods(methods) -> list:
    """'all', a comma-separated string or a list -> validated method names for text models."""

    def check(name, spec):
        if not spec.needs <= TEXT_NEEDS:
            missing = ", ".join(sorted(spec.needs - TEXT_NEEDS))
            raise MethodError(f"method '{name}' is not available for text models yet (it needs {missing}); "
                              f"use {', '.join(TEXT_METHODS)}")

    return expand_methods(methods, TEXT_METHODS, check)


@dataclass
class Objective:
    """A scalar of sentence embeddings to explain for a plain encoder.

    ``fn(emb)`` (no pairs) or ``fn(emb_a, emb_b)`` (pairs) returns one value per text, (P,).
    """

    name: str
    fn: Callable
    pairwise: bool


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


def lrp_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dot product with its relevance split equally between the two embeddings (uniform rule)."""
    return uniform_mul(a, b).sum(dim=-1)


def lrp_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine similarity with both norms treated as constants (same value, conservative backward).

    Gradient x input through the full cosine sums to zero (it is scale-invariant in each embedding:
    Euler's theorem for a function homogeneous of degree 0), so the norms are detached and the
    relevance of a and b sums to the cosine itself."""
    eps = 1e-8
    norms = (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps)).detach()
    return lrp_dot(a, b) / norms


def lrp_objective(objective: "Objective") -> "Objective":
    """The form of an objective an LRP pass differentiates: cosine / dot with the rules above;
    any other callable as given (its plain gradient)."""
    if objective.fn is cosine:
        return Objective(objective.name, lrp_cosine, objective.pairwise)
    if objective.fn is dot:
        return Objective(objective.name, lrp_dot, objective.pairwise)
    return objective


def resolve_objective(objective, has_pairs: bool) -> Objective | None:
    """None -> cosine similarity with the pair (or nothing without pairs); a name; or a callable."""
    if objective is None:
        return Objective("cosine similarity", cosine, True) if has_pairs else None
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        key = objective.strip().lower()
        if key in ("similarity", "cosine", "cos"):
            fn, name = cosine, "cosine similarity"
        elif key == "dot":
            fn, name = dot, "dot product"
        else:
            raise MethodError(f"unknown objective {objective!r}: use 'similarity', 'dot' or a callable")
        if not has_pairs:
            raise MethodError(f"objective '{key}' compares two texts: give a second text (--pair / pairs=)")
        return Objective(name, fn, True)
    if callable(objective):
        name = getattr(objective, "__name__", "") or "objective"
        return Objective("objective" if name == "<lambda>" else name, objective, has_pairs)
    raise MethodError(f"cannot use a {type(objective).__name__} as an objective")


@dataclass
class TextBatchResult:
    """What one text batch produced.

    Attributes
    ----------
    logits : Tensor or None
        (S, classes) for a classifier, detached.
    targets : LongTensor or None
        (S, K) explained classes of a classifier.
    values : Tensor
        (items, K) the explained scalars (target logits, or objective values), detached.
    token_maps : dict
        method -> list over sequences of (K, n) raw scores of the sequence's real tokens.
    attentions : list or None
        per sequence, (L, heads, n, n) attention of the real tokens (CPU, float32).
    """

    logits: torch.Tensor | None
    targets: torch.Tensor | None
    values: torch.Tensor
    token_maps: dict
    attentions: list | None


class TextTask(ExplainTask):
    """A batch of token sequences: the leaf is the word embeddings, one view per sequence (real tokens only)."""

    def __init__(self, model: TextModel, batch: TextBatch, target=None, objective: Objective | None = None,
                 keep_attentions: bool = True, contrast: torch.Tensor | None = None):
        self.model, self.batch, self.target, self.objective = model, batch, target, objective
        #: (S, 1) token ids whose score is subtracted from the target's (a contrastive target), or None
        self.contrast = contrast
        # the attention views are drawn from the same capture (without them, an LRP-only request
        # needs no plain forward at all)
        self.keep_attentions = keep_attentions
        self.num_views = len(batch)
        self.targets = None

    def leaf(self):
        return self.model.embed(self.batch.input_ids)

    def forward(self, leaf):
        return self.model.forward(self.batch, leaf)

    def scores(self, output, lrp=False):
        if self.model.is_classifier:
            if self.targets is None:
                self.targets = resolve_targets(self.model, output.detach(), self.target)
            return self._contrasted(output, self.targets, slice(None))
        if self.objective is None:
            return output.new_zeros(0, 1)  # attention views only: nothing to explain
        objective = lrp_objective(self.objective) if lrp else self.objective
        return _apply_objective(objective, self.model.pool(output, self.batch.attention_mask))[:, None]

    def layer_score(self, hidden, pool, slot):
        mask = self.batch.attention_mask
        if self.model.is_classifier:
            scores = self.model.layer_scores(hidden, mask, pool)
            return self._contrasted(scores, self.targets[:, slot:slot + 1], slice(None)).sum()
        hidden = getattr(self.model, "layer_states", lambda h: h)(hidden)  # T5: through the final norm
        pooled = self.model.pool(hidden, mask) if pool == "model" else self.model.pool_mean(hidden, mask)
        return _apply_objective(self.objective, pooled).sum()

    def views(self, captured, slot=0):
        return [_sequence_captured(self.model, self.batch, s, captured) for s in range(len(self.batch))]

    def view_blocks(self, slot=0):
        return [(s, self.batch.real_index(s)) for s in range(len(self.batch))]

    def lrp_views(self, leaf, grad, key, slot=0):
        return [Captured([], None, None, 0, (1, xs.shape[-1]), input_relevance={key: (xs, gs)})
                for xs, gs in self.input_views(leaf, grad, slot)]

    def input_views(self, leaf, values, slot=0):
        views = []
        for s in range(len(self.batch)):
            # (n, E) real tokens -> (1, E, 1, n): the input methods reduce dim 1 (image channels)
            views.append(_sequence_channels(self.batch, s, leaf, values))
        return views

    def score_rows(self, x, rows):
        if not self.model.is_classifier:
            raise MethodError("method 'integrated-gradients' explains a target score of a classifier or a causal "
                              "decoder; a plain encoder's objective is not re-scored at interpolated inputs")
        b = self.batch
        sub = TextBatch(b.input_ids[rows], b.attention_mask[rows],
                        None if b.token_type_ids is None else b.token_type_ids[rows], [], [], [], [], [])
        return self._contrasted(self.model.forward(sub, x), self.targets[rows], rows)

    def _contrasted(self, scores, targets, rows):
        """The targets' scores, minus the contrast token's (of the same rows) for a contrastive target."""
        values = scores.gather(1, targets)
        if self.contrast is not None:
            values = values - scores.gather(1, self.contrast[rows].expand_as(targets))
        return values

    def baselines(self):
        leaf = self.model.embed(self.batch.input_ids)
        out = {"zero": torch.zeros((), device=leaf.device, dtype=leaf.dtype)}
        tok = getattr(self.model, "tokenizer", None)
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None:
            # inseq's baseline: the unknown token at every position, end-of-sequence tokens kept
            eos = getattr(tok, "eos_token_id", None)
            ids = torch.full_like(self.batch.input_ids, int(unk))
            if eos is not None:
                ids = torch.where(self.batch.input_ids == eos, self.batch.input_ids, ids)
            out["unk"] = self.model.embed(ids)
        return out


def run_text_batch(model: TextModel, batch: TextBatch, methods: dict, target=None, objective: Objective | None = None,
                   keep_attentions: bool = True, contrast: torch.Tensor | None = None) -> TextBatchResult:
    """Explain one batch of sequences with every requested method (the engine's one pass).

    Parameters
    ----------
    model : TextModel
    batch : TextBatch
        For a plain encoder with a pairwise objective: the P first texts, then their P pairs.
    methods : dict
        method name -> resolved parameters (every method's needs within :data:`TEXT_NEEDS`).
    target : see :func:`vitlens.engine.resolve_targets` (classifiers only).
    objective : Objective, optional
        Required for a plain encoder when methods are asked for.
    contrast : LongTensor, optional
        (S,) or (S, 1) classes (a decoder's tokens) whose score is subtracted from each target's: the explained
        value is score(target) - score(contrast) (for a decoder's log-probabilities the same as the logits').
    """
    for name in methods:
        parse_text_methods([name])
    if methods and not model.is_classifier and objective is None:
        raise MethodError("a plain encoder has no class to explain: give a second text to explain the similarity "
                          "(--pair / pairs=) or an objective")
    if objective is not None and objective.pairwise and len(batch) % 2:
        raise MethodError("a pairwise objective needs the texts followed by their pairs (an even number of sequences)")
    if contrast is not None:
        if not model.is_classifier:
            raise MethodError("a contrastive target needs classes (a classifier or a causal decoder)")
        contrast = torch.as_tensor(contrast, dtype=torch.long, device=batch.input_ids.device).reshape(len(batch), 1)
    task = TextTask(model, batch, target, objective, keep_attentions, contrast)
    result = run_task(task, methods)
    attentions = None
    if keep_attentions:
        attentions = []
        for s in range(len(batch)):
            idx = batch.real_index(s)
            stacked = torch.stack([a[s] for a in result.attentions])  # (L, H, N, N)
            attentions.append(stacked.index_select(-2, idx).index_select(-1, idx).float().cpu())
    maps = {name: [torch.stack([m.reshape(-1) for m in per_slot]) for per_slot in per_sequence]
            for name, per_sequence in result.maps.items()}
    logits = result.output if model.is_classifier else None
    return TextBatchResult(logits, task.targets, result.values, maps, attentions)


def _apply_objective(objective: Objective, pooled: torch.Tensor) -> torch.Tensor:
    if objective.pairwise:
        half = pooled.shape[0] // 2
        out = objective.fn(pooled[:half], pooled[half:])
    else:
        out = objective.fn(pooled)
    out = torch.as_tensor(out)
    if out.dim() != 1:
        raise MethodError(f"the objective must give one value per text, got shape {tuple(out.shape)}")
    return out


def _sequence_captured(model: TextModel, batch: TextBatch, s: int, captured: Captured, idx=None) -> Captured:
    """The captured tensors of sequence ``s`` restricted to its real tokens (or the positions ``idx``): a (1, n)
    token grid read out at its last token by a causal decoder."""
    idx = batch.real_index(s) if idx is None else idx

    def block(t):
        return t[s:s + 1].index_select(-2, idx).index_select(-1, idx)

    n = int(idx.numel())
    attn = [block(a) for a in captured.attentions]
    grads = None if captured.gradients is None else [block(g) for g in captured.gradients]
    layer_grads = {key: block(g) for key, g in captured.layer_gradients.items()}
    # the engine's terms: each view's part was computed from its own block (ExplainTask.view_blocks)
    terms = {key: [block(t) for t in per_layer] for key, per_layer in captured.layer_terms.items()}
    # without attention (input-gradient methods alone): the readout in float32 on the batch's device
    device, dtype = (attn[0].device, attn[0].dtype) if attn else (batch.input_ids.device, torch.float32)
    readout = model.readout_weights(n, device=device, dtype=dtype)
    ids = batch.input_ids[s].index_select(0, idx).to(dtype).view(1, 1, 1, n)  # for the baselines
    input_gradient = None
    if captured.input_gradient is not None:
        input_gradient = _sequence_channels(batch, s, *captured.input_gradient, idx=idx)
    return Captured(attentions=attn, gradients=grads, readout=readout, num_prefix=0, grid=(1, n),
                    layer_gradients=layer_grads, inputs=ids, input_gradient=input_gradient, layer_terms=terms)


def _sequence_channels(batch: TextBatch, s: int, *tensors, idx=None) -> tuple:
    """Sequence ``s``'s real tokens (or the positions ``idx``) of (S, N, E) tensors, each as (1, E, 1, n): channels
    in dim 1."""
    idx = batch.real_index(s) if idx is None else idx
    n = int(idx.numel())
    return tuple(t[s].index_select(0, idx).t().reshape(1, -1, 1, n) for t in tensors)


__all__ = ["Objective", "TEXT_DEFAULTS", "TEXT_METHODS", "TextBatchResult", "TextTask", "lrp_objective",
           "parse_text_methods", "resolve_objective", "run_text_batch", "text_params"]
