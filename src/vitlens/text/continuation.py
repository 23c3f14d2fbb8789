"""Explaining continuations of a causal decoder: a given or greedily generated continuation, a position inside
the text, contrastive targets.

Given a prompt p_1..p_P and a continuation c_1..c_T (given as text, generated greedily, or the token at a
position inside the text), step t explains the score of c_t at position P - 1 + t of the sequence
s = p_1..p_P c_1..c_{T-1}: its logit or log-probability (the model's ``score``), or with a contrast token c'_t
the difference score(c_t) - score(c'_t) (the same for logits and log-probabilities: the log-sum-exp cancels).

Teacher forcing: the whole sequence s goes through the model once, and the engine's usual pass runs with
one *target slot per step* (:class:`ContinuationTask`): per step one backward (all attention gradients and the
input gradient together), LeGrad's partial backwards, one backward per step of each LRP pass, integrated
gradients with every step in one captum call. Step t's view is the block of positions 0..P - 1 + t, read out
at its last token, so a step's attribution is what explaining the next token after that prefix alone gives
(causal attention: later tokens change nothing before them). The attributions form a matrix: rows the
tokens of s, columns the steps, NaN where a row comes after the step's position.

The score of the whole continuation is the sum of its log-probabilities sum_t log p(c_t | s_<P+t); the
methods without a readout token (``attnlrp``, ``cp-lrp``, ``saliency``, ``input-x-gradient``,
``integrated-gradients``) also explain that sum, with one more forward and one backward
(:class:`SequenceScoreTask`; with a contrast, the sum of the log-probability differences).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vitlens.errors import InputError, MethodError, TargetError
from vitlens.methods import INPUT_GRADIENT, LRP, PATH_GRADIENTS, check_baselines, check_params_for_model, get_method
from vitlens.render.atomic import ensure_dir, write_text_atomic
from vitlens.text.batch import TextBatch
from vitlens.text.task import TextTask, _sequence_captured, _sequence_channels, parse_text_methods, text_params

#: the needs of the methods that also explain the whole continuation's score (no readout token needed)
SEQUENCE_NEEDS = frozenset({LRP, INPUT_GRADIENT, PATH_GRADIENTS})


class ContinuationTask(TextTask):
    """One sequence (prompt + continuation without its last token); target slot t = generation step t.

    ``positions`` (T,): the position each step's score is read at (P - 1 + t); ``tokens`` (1, T): the explained
    continuation tokens; ``contrast`` (1, T) or None: tokens whose score is subtracted.
    """

    def __init__(self, model, batch: TextBatch, positions: torch.Tensor, tokens: torch.Tensor,
                 contrast: torch.Tensor | None = None, keep_attentions: bool = False):
        super().__init__(model, batch, None, None, keep_attentions)
        self.positions, self.tokens, self.step_contrast = positions, tokens, contrast
        self.targets = tokens

    def _all_scores(self, batch: TextBatch, embeds: torch.Tensor) -> torch.Tensor:
        """(S, N, vocabulary) scores at every position (logits or log-probabilities, the model's score)."""
        hidden = self.model.hidden_states(batch, embeds)
        return self.model._scores(self.model.lm_head(hidden))

    def forward(self, leaf):
        return self._all_scores(self.batch, leaf)

    def _step_values(self, scores: torch.Tensor) -> torch.Tensor:
        """(S, N, V) -> (S, T) the explained value of every step."""
        chosen = scores[:, self.positions]  # (S, T, V)
        rows = chosen.shape[0]
        values = chosen.gather(2, self.tokens.expand(rows, -1)[..., None])[..., 0]
        if self.step_contrast is not None:
            values = values - chosen.gather(2, self.step_contrast.expand(rows, -1)[..., None])[..., 0]
        return values

    def scores(self, output, lrp=False):
        return self._step_values(output)

    def layer_score(self, hidden, pool, slot):
        position = int(self.positions[slot])
        state = hidden[:, position] if pool == "model" else hidden[:, :position + 1].mean(dim=1)
        scores = self.model._scores(self.model.lm_head(self.model.final_norm(state)))
        value = scores.gather(1, self.tokens[:, slot:slot + 1])
        if self.step_contrast is not None:
            value = value - scores.gather(1, self.step_contrast[:, slot:slot + 1])
        return value.sum()

    def _prefix(self, slot: int) -> torch.Tensor:
        return torch.arange(int(self.positions[slot]) + 1, device=self.batch.input_ids.device)

    def views(self, captured, slot=0):
        return [_sequence_captured(self.model, self.batch, 0, captured, self._prefix(slot))]

    def view_blocks(self, slot=0):
        return [(0, self._prefix(slot))]

    def input_views(self, leaf, values, slot=0):
        return [_sequence_channels(self.batch, 0, leaf, values, idx=self._prefix(slot))]

    def score_rows(self, x, rows):
        b = self.batch
        sub = TextBatch(b.input_ids[rows], b.attention_mask[rows], None, [], [], [], [], [])
        return self._step_values(self._all_scores(sub, x))


class SequenceScoreTask(ContinuationTask):
    """The same sequence with one target: the sum over the steps of log p(c_t) (minus log p(c'_t) with a
    contrast), for the methods that need no readout token; the view is the whole sequence."""

    def _all_scores(self, batch, embeds):
        hidden = self.model.hidden_states(batch, embeds)
        return torch.log_softmax(self.model.lm_head(hidden), dim=-1)

    def _step_values(self, scores):
        return super()._step_values(scores).sum(dim=1, keepdim=True)

    def layer_score(self, hidden, pool, slot):
        raise MethodError("the whole continuation's score is explained by attnlrp, cp-lrp and the gradient methods")

    def _prefix(self, slot):
        return torch.arange(self.batch.input_ids.shape[1], device=self.batch.input_ids.device)


@dataclass
class ContinuationResult:
    """The attributions of every step of a continuation.

    Attributes
    ----------
    text : str
        The prompt.
    tokens : list of str
        Every token of prompt + continuation, as the tokenizer names them (P + T).
    ids : list of int
    prompt_length : int
        P: the continuation starts at token P.
    steps : list of dict
        Per step: ``position`` (of the token in ``tokens``), ``token``, ``id``, ``value`` (the explained score),
        ``logprob``, and ``contrast`` / ``contrast_id`` with a contrastive target.
    value_name : str
        What each step explains (``next-token logit``, ``next-token log-probability``, or their difference).
    sequence_logprob : float
        The score of the whole continuation: sum of its log-probabilities.
    matrices : dict
        method -> (P + T - 1, T) array: row r = token r of prompt + continuation, column t = step t, raw
        attribution; NaN where r > P - 1 + t (tokens the step does not see).
    sequence : dict
        method -> (P + T - 1,) attributions of the whole continuation's log-probability (LRP and gradient methods).
    generated : bool
        True when the continuation was generated greedily.
    """

    text: str
    tokens: list
    ids: list
    prompt_length: int
    steps: list
    value_name: str
    sequence_logprob: float
    methods: list
    params: dict
    matrices: dict = field(default_factory=dict)
    sequence: dict = field(default_factory=dict)
    generated: bool = False
    model_description: dict | None = None
    #: every token as text (``' Paris'``), for labels
    labels: list = field(default_factory=list)

    @property
    def continuation(self) -> str:
        return "".join(step["token"] for step in self.steps)

    def to_dict(self) -> dict:
        def clean(array):
            return [[None if math.isnan(v) else round(float(v), 8) for v in row] for row in np.atleast_2d(array)]

        return {"model": self.model_description, "prompt": self.text, "continuation": self.continuation,
                "generated": self.generated, "tokens": self.tokens, "labels": self.labels, "ids": self.ids,
                "prompt_length": self.prompt_length, "explained": self.value_name, "steps": self.steps,
                "sequence_logprob": round(self.sequence_logprob, 8), "methods": self.methods,
                "params": self.params,
                "matrices": {m: clean(a) for m, a in self.matrices.items()},
                "sequence": {m: clean(a)[0] for m, a in self.sequence.items()}}

    def save(self, out, formats=("png",)) -> list:
        """``continuation.json`` and a heatmap of every method's matrix (``continuation.png``)."""
        out = ensure_dir(out)
        paths = [write_text_atomic(out / "continuation.json", json.dumps(self.to_dict(), indent=1,
                                                                         ensure_ascii=False))]
        if self.matrices:
            paths += continuation_figure(self, out / "continuation", formats)
        return paths


def continuation_figure(result: ContinuationResult, stem, formats=("png",)) -> list:
    """One heatmap per method: source tokens (rows) x generated tokens (columns), each column divided by its
    largest absolute value; signed methods blue-white-red, the others white-to-red; unseen cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.matrices)
    rows, cols = result.matrices[names[0]].shape
    width = min(4 + 0.45 * cols * len(names), 40)
    height = min(2 + 0.28 * rows, 40)
    fig, axes = plt.subplots(1, len(names), figsize=(width, height), squeeze=False)
    labels = [repr(t)[1:-1] for t in (result.labels or result.tokens)[:rows]]
    columns = [repr(step["token"])[1:-1] for step in result.steps]
    for ax, name in zip(axes[0], names):
        matrix = result.matrices[name]
        scale = np.nanmax(np.abs(matrix), axis=0, keepdims=True)
        shown = matrix / np.where(scale > 0, scale, 1)
        signed = bool(get_method(name).signed)
        cmap = plt.get_cmap("bwr" if signed else "Reds").copy()
        cmap.set_bad("#dddddd")
        ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-1 if signed else 0, vmax=1, aspect="auto",
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(cols), columns, rotation=90, fontsize=7)
        step = max(1, rows // 64)
        ax.set_yticks(range(0, rows, step), labels[::step], fontsize=7)
        ax.axhline(result.prompt_length - 0.5, color="black", linewidth=0.6)
    fig.suptitle(f"{result.value_name} of each generated token (columns) attributed to the tokens before it",
                 fontsize=9)
    fig.tight_layout()
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------- the API
def greedy_continuation(model, ids: list, count: int) -> list:
    """``count`` tokens generated greedily after ``ids`` (fewer when the model ends the text with its
    end-of-sequence token), as ``model.generate(do_sample=False)`` does."""
    module = model.module
    input_ids = torch.tensor([ids], device=model.device)
    tok = model.tokenizer
    pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                            getattr(module.config, "eos_token_id", None)) if t is not None), 0)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    with model.eval_mode(), torch.no_grad():
        out = module.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=count, min_new_tokens=0, pad_token_id=int(pad), num_beams=1)
    return [int(t) for t in out[0, len(ids):].tolist()]


def _token_ids(model, text: str, what: str) -> list:
    if not isinstance(text, str) or not text:
        raise InputError(f"empty {what}: give at least one token")
    ids = [int(t) for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InputError(f"empty {what}: give at least one token")
    return ids


def explain_continuation(model, text: str, continuation: str | None = None, generate: int | None = None,
                         position: int | None = None, contrast: str | None = None, methods="all",
                         params: dict | None = None, keep_attentions: bool = False) -> ContinuationResult:
    """Attributions of every token of a continuation of ``text`` by a causal decoder (teacher forcing).

    Exactly one of

    * ``continuation``: the continuation's text (tokenized on its own, no special tokens: a leading space
      matters, ``" Paris is"``);
    * ``generate``: generate that many tokens greedily (``do_sample=False``; stops early at end-of-sequence);
    * ``position``: explain the token at that position of ``text`` (negative from the end) from the tokens
      before it.

    ``contrast``: a text of as many tokens as the continuation; step t then explains score(c_t) - score(c'_t).
    ``methods`` and ``params`` as for :func:`vitlens.text.explain_text`; every text method runs per step.
    """
    from vitlens.cliargs import check_params_requested
    from vitlens.text.loading import load_text_model
    from vitlens.text.base import TextModel

    model = model if isinstance(model, TextModel) else load_text_model(model)
    if not getattr(model, "is_causal", False):
        raise MethodError("continuations are explained for causal decoders (GPT-2, Llama, Mistral, Qwen2/3)")
    if model.tokenizer is None:
        raise InputError("this text model has no tokenizer: pass tokenizer= to load_text_model")
    given = [name for name, value in (("continuation", continuation), ("generate", generate),
                                      ("position", position)) if value is not None]
    if len(given) != 1:
        raise InputError("give one of continuation=, generate= or position= (--continuation, --generate, "
                         "--position)" + (f", not {' and '.join(given)}" if given else ""))
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty text: give at least one word to explain")
    names = parse_text_methods(methods) if methods not in (None, [], (), "") else []
    if not names:
        raise MethodError("no methods given")
    check_params_requested(params, names, option="params", among="the methods")
    resolved = {name: text_params(name, (params or {}).get(name)) for name in names}
    check_params_for_model(resolved, model.num_layers)
    check_baselines(resolved, model)
    ids = [int(t) for t in model.tokenizer(text, add_special_tokens=True)["input_ids"]]
    generated = False
    if position is not None:
        if isinstance(position, bool) or not isinstance(position, int):
            raise InputError(f"position must be a token index, got {position!r}")
        if not -len(ids) < position < len(ids) or position % len(ids) == 0:
            raise InputError(f"position {position} has no token before it or is beyond the text's {len(ids)} "
                             f"tokens: give 1 to {len(ids) - 1} (or -1 to -{len(ids) - 1})")
        cut = position % len(ids)
        prompt, steps = ids[:cut], ids[cut:cut + 1]
    elif generate is not None:
        if isinstance(generate, bool) or not isinstance(generate, int) or generate < 1:
            raise InputError(f"generate must be a number of tokens >= 1, got {generate!r}")
        prompt, steps = ids, greedy_continuation(model, ids, generate)
        generated = True
    else:
        prompt, steps = ids, _token_ids(model, continuation, "continuation")
    total = len(prompt) + len(steps) - 1
    if total > model.max_length:
        raise InputError(f"the text and its continuation have {total + 1} tokens but the model takes at most "
                         f"{model.max_length}")
    contrast_ids = None
    if contrast is not None:
        contrast_ids = _token_ids(model, contrast, "contrast")
        if len(contrast_ids) != len(steps):
            raise TargetError(f"the contrast {contrast!r} is {len(contrast_ids)} token(s) but the continuation is "
                              f"{len(steps)}: give one contrast token per continuation token")
    sequence = prompt + steps[:-1]
    device = model.device
    tokens = model.tokenizer.convert_ids_to_tokens(prompt + steps)
    special_ids = set(int(i) for i in (model.tokenizer.all_special_ids or []))
    special = [t in special_ids for t in sequence]
    false = [False] * len(sequence)
    batch = TextBatch(torch.tensor([sequence], device=device), torch.ones(1, len(sequence), dtype=torch.long,
                                                                           device=device),
                      None, [tokens[:len(sequence)]], [special], [list(false)], [list(false)],
                      [list(range(len(sequence)))], [[0] * len(sequence)])
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(steps), device=device)
    step_ids = torch.tensor([steps], device=device)
    contrast_tensor = None if contrast_ids is None else torch.tensor([contrast_ids], device=device)
    from vitlens.engine import run_task

    task = ContinuationTask(model, batch, positions, step_ids, contrast_tensor, keep_attentions)
    result = run_task(task, resolved)
    logprobs = torch.log_softmax(result.output.float()[0, positions], dim=-1)  # (T, V)
    step_logprobs = logprobs.gather(1, step_ids[0][:, None])[:, 0]
    matrices = {}
    for name in names:
        matrix = np.full((len(sequence), len(steps)), np.nan)
        for t, part in enumerate(result.maps[name][0]):
            column = part.reshape(-1).double().cpu().numpy()
            matrix[:column.size, t] = column
        matrices[name] = matrix
    sequence_scores = {}
    chosen = {n: p for n, p in resolved.items() if get_method(n).needs <= SEQUENCE_NEEDS}
    if chosen:
        whole = run_task(SequenceScoreTask(model, batch, positions, step_ids, contrast_tensor, False), chosen)
        for name in chosen:
            sequence_scores[name] = whole.maps[name][0][0].reshape(-1).double().cpu().numpy()
    value_name = model.value_name
    if contrast_ids is not None:
        value_name += " difference (target - contrast)"
    rows = []
    for t, token_id in enumerate(steps):
        row = {"position": len(prompt) + t, "token": model.tokenizer.decode([token_id]), "id": token_id,
               "value": float(result.values[0, t]), "logprob": float(step_logprobs[t])}
        if contrast_ids is not None:
            row["contrast"] = model.tokenizer.decode([contrast_ids[t]])
            row["contrast_id"] = contrast_ids[t]
        rows.append(row)
    return ContinuationResult(text, list(tokens), prompt + steps, len(prompt), rows, value_name,
                              float(step_logprobs.sum()), names, resolved, matrices, sequence_scores, generated,
                              model.describe(), [model.tokenizer.decode([i]) for i in prompt + steps])


__all__ = ["ContinuationResult", "ContinuationTask", "SequenceScoreTask", "continuation_figure",
           "explain_continuation", "greedy_continuation"]
