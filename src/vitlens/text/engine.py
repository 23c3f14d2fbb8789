"""The one pass for text: the image engine's plan, targets, gradients and methods on token sequences.

Per batch of (padded) sequences: one forward with attention capture from the word embeddings, then
per target at most one ``torch.autograd.grad`` of the summed target scores with respect to every
layer's attention (GMAR, GMAR++, Chefer) and, for LeGrad, one partial backward per layer -- the same
captures :func:`vitlens.engine.run_batch` makes, planned by the same :func:`vitlens.engine.plan`.

Why not ``run_batch`` itself: its methods see the whole padded batch with one readout vector. For
text that is wrong in two ways. (1) The gradient of a score with respect to an attention entry of a
*padded key* is not zero even though the entry is (it is the upstream gradient times that key's
value vector), so GMAR's head norms and LeGrad's query means would change with the amount of
padding. (2) A plain encoder reads its sentence embedding from the mean of each sequence's real
tokens: the readout differs per sequence. So after the shared pass every method runs on each
sequence's real-token block of the captured tensors (padding removed), with that sequence's own
readout -- which makes a padded batch give exactly the one-at-a-time result. The method functions
are the registered image methods, unchanged: a sequence of n tokens is a (1, n) "grid" with no
prefix tokens.

Scores: a classifier explains target logits (``target`` as in the image API: None/'pred', an index,
a label name, 'topK', one per text); a plain encoder explains a scalar of its sentence embeddings,
by default the cosine similarity of each text with its pair (``objective``).

Methods with a modified backward (AttnLRP / CP-LRP, ``needs`` = {'lrp'}) get their own forward per
distinct rule set, as in the image engine: inside :func:`vitlens.lrp.lrp_rules` and
``model.capture(LRPRecorder(config))``, from the word embeddings as a leaf, one backward per target;
the relevance of a token is its embedding times the modified gradient, summed over channels
(padding excluded). A plain encoder's similarity is explained with the norms detached and the dot
product's relevance split equally between the two sentences (see :func:`lrp_objective`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vitlens.engine import _grads, plan, resolve_targets
from vitlens.errors import MethodError
from vitlens.lrp import LRPConfig, LRPRecorder, lrp_rules
from vitlens.lrp.rules import uniform_mul
from vitlens.methods import ATTENTIONS, GRADIENTS, LAYER_GRADIENTS, LRP, Captured, expand_methods, get_method
from vitlens.models.capture import AttentionRecorder
from vitlens.text.adapters import TextBatch, TextModel

#: what ``all`` means for text
TEXT_METHODS = ("attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "attnlrp")
#: captures the text engine can make
TEXT_NEEDS = frozenset({ATTENTIONS, GRADIENTS, LAYER_GRADIENTS, LRP})
#: text defaults that differ from the image ones: the plain gradient (LRP-0 / epsilon rule) on every
#: linear layer, as LXT explains language models; Gamma is the ViT setting (override with params)
TEXT_DEFAULTS = {"attnlrp": {"lin_gamma": 0.0}, "cp-lrp": {"lin_gamma": 0.0}}


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


def run_text_batch(model: TextModel, batch: TextBatch, methods: dict, target=None, objective: Objective | None = None,
                   keep_attentions: bool = True) -> TextBatchResult:
    """Explain one batch of sequences with every requested method.

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
    """
    for name in methods:
        parse_text_methods([name])
    lrp_methods = {n: p for n, p in methods.items() if LRP in get_method(n).needs}
    shared_methods = {n: p for n, p in methods.items() if n not in lrp_methods}
    needs, layer_requests, _ = plan(shared_methods, model.num_layers)
    if methods and not model.is_classifier and objective is None:
        raise MethodError("a plain encoder has no class to explain: give a second text to explain the similarity "
                          "(--pair / pairs=) or an objective")
    want_gradients = bool({GRADIENTS, LAYER_GRADIENTS} & needs)
    mask = batch.attention_mask
    num_seq = len(batch)
    if objective is not None and objective.pairwise and num_seq % 2:
        raise MethodError("a pairwise objective needs the texts followed by their pairs (an even number of sequences)")
    with model.eval_mode(), torch.set_grad_enabled(want_gradients), contextlib.ExitStack() as stack:
        recorder = AttentionRecorder(keep_block_outputs=LAYER_GRADIENTS in needs)
        stack.enter_context(model.capture(recorder))
        embeds = model.embed(batch.input_ids)
        if want_gradients:
            embeds.requires_grad_(True)  # a graph even when every parameter is frozen
        output = model.forward(batch, embeds)
        stack.close()  # the model is back to normal before anything else runs
        if len(recorder.attentions) != model.num_layers:
            raise RuntimeError(f"captured {len(recorder.attentions)} attention maps for {model.num_layers} layers")

        logits = targets = None
        if model.is_classifier:
            logits = output
            targets = resolve_targets(model, logits.detach(), target)
            slots = [logits.gather(1, targets[:, k:k + 1]) for k in range(targets.shape[1])]
            values = torch.cat(slots, dim=1)
        else:
            values = _objective_values(model, objective, output, mask)[:, None] if objective else torch.zeros(0, 1)
        num_slots = values.shape[1]

        token_maps: dict = {name: [[] for _ in range(num_seq)] for name in methods}
        if shared_methods:
            for slot in range(num_slots):
                gradients = None
                if GRADIENTS in needs:
                    gradients = _grads(values[:, slot].sum(), recorder.attentions)
                layer_gradients = {}
                for pool, layer in sorted(layer_requests):
                    hidden = recorder.block_outputs[layer]
                    if model.is_classifier:
                        score = model.layer_scores(hidden, mask, pool).gather(1, targets[:, slot:slot + 1]).sum()
                    else:
                        pooled = model.pool(hidden, mask) if pool == "model" else model.pool_mean(hidden, mask)
                        score = _apply_objective(objective, pooled).sum()
                    layer_gradients[(pool, layer)] = _grads(score, [recorder.attentions[layer]])[0]
                for s in range(num_seq):
                    captured = _sequence_captured(model, batch, s, recorder.attentions, gradients, layer_gradients)
                    for name, params in shared_methods.items():
                        token_map = get_method(name).function(captured, **params).detach()
                        token_maps[name][s].append(token_map.reshape(-1))
        attentions = None
        if keep_attentions:
            attentions = []
            for s in range(num_seq):
                idx = batch.real_index(s)
                stacked = torch.stack([a[s].detach() for a in recorder.attentions])  # (L, H, N, N)
                attentions.append(stacked.index_select(-2, idx).index_select(-1, idx).float().cpu())
        del recorder
    # LRP changes the backward of the whole model: one extra pass per distinct rule set
    by_config: dict = {}
    for name, params in lrp_methods.items():
        by_config.setdefault((name, params["conv_gamma"], params["lin_gamma"]), []).append(name)
    for (variant, conv_gamma, lin_gamma), names in by_config.items():
        key = (variant, conv_gamma, lin_gamma)
        pairs = _lrp_pass(model, batch, LRPConfig(variant, conv_gamma, lin_gamma), targets, objective, num_slots)
        for s in range(num_seq):
            idx = batch.real_index(s)
            n = int(idx.numel())
            for x, grad in pairs:
                # (n, E) real tokens -> (1, E, 1, n): the LRP methods sum over dim 1 (image channels)
                xs, gs = (t[s].index_select(0, idx).t().reshape(1, -1, 1, n) for t in (x, grad))
                captured = Captured([], None, None, 0, (1, n), input_relevance={key: (xs, gs)})
                for name in names:
                    relevance = get_method(name).function(captured, **methods[name]).detach()
                    token_maps[name][s].append(relevance.reshape(-1))
    maps = {name: [torch.stack(per_slot) for per_slot in per_seq] for name, per_seq in token_maps.items()}
    return TextBatchResult(None if logits is None else logits.detach(), targets, values.detach(), maps, attentions)


def _lrp_pass(model: TextModel, batch: TextBatch, config: LRPConfig, targets, objective, num_slots: int) -> list:
    """A forward with LRP rules from the word embeddings, one backward per target slot: [(embeds, grad)].

    Targets come resolved from the shared pass, so every method explains the same scores.
    """
    with model.eval_mode(), torch.enable_grad():
        embeds = model.embed(batch.input_ids).requires_grad_(True)
        recorder = LRPRecorder(config)
        with lrp_rules(model.module, config), model.capture(recorder):
            output = model.forward(batch, embeds)
        if model.is_classifier:
            scores = [output.gather(1, targets[:, k:k + 1]).sum() for k in range(num_slots)]
        else:
            values = _apply_objective(lrp_objective(objective), model.pool(output, batch.attention_mask))
            scores = [values.sum()]
        pairs = [(embeds.detach(), _grads(score, [embeds])[0]) for score in scores]
        del recorder
    return pairs


def _objective_values(model: TextModel, objective: Objective, hidden, mask) -> torch.Tensor:
    return _apply_objective(objective, model.pool(hidden, mask))


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


def _sequence_captured(model, batch, s, attentions, gradients, layer_gradients) -> Captured:
    """The captured tensors of sequence ``s`` restricted to its real tokens: a (1, n) token grid."""
    idx = batch.real_index(s)

    def block(t):
        return t[s:s + 1].index_select(-2, idx).index_select(-1, idx)

    n = int(idx.numel())
    attn = [block(a.detach()) for a in attentions]
    grads = None if gradients is None else [block(g) for g in gradients]
    layer_grads = {key: block(g) for key, g in layer_gradients.items()}
    readout = model.readout(n, device=attn[0].device, dtype=attn[0].dtype)
    ids = batch.input_ids[s].index_select(0, idx).to(attn[0].dtype).view(1, 1, 1, n)  # for the baselines
    return Captured(attentions=attn, gradients=grads, readout=readout, num_prefix=0, grid=(1, n),
                    layer_gradients=layer_grads, inputs=ids)


__all__ = ["Objective", "TEXT_DEFAULTS", "TEXT_METHODS", "TextBatchResult", "lrp_objective", "parse_text_methods",
           "resolve_objective", "run_text_batch", "text_params"]
