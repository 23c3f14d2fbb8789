"""Per-head attention statistics, and synthetic reference patterns with known values.

For one sequence of n real tokens (padding removed; rows are queries i, columns keys j, every row
sums to 1) and each layer and head:

* ``entropy``       mean over rows of H_i = -sum_j A_ij ln A_ij (nats; 0 ln 0 = 0)
* ``entropy_norm``  mean over rows of H_i / ln n (1 = uniform rows, 0 = one key per row; 0 when n = 1)
* ``distance``      mean over rows of sum_j A_ij |i - j| (tokens)
* ``special``       mean over rows of the mass on special tokens ([CLS], [SEP], <s>, </s>, ...)
* ``cls``, ``sep``  the same for the classifier token and the separator tokens alone
* ``local``         mean over rows of the mass within the window |i - j| <= w (w = ``window``, default 2)
* ``previous``      mean over rows i >= 1 of A_{i, i-1}
* ``global``        max over keys j of the column mean (1/n) sum_i A_ij: the share of all attention
                    that the single most-attended token receives (1 when every query looks at the
                    same token, a "vertical" head; 1/n for uniform or diagonal attention)
* ``causal``        mean over rows of the mass on keys j <= i (the past and the token itself): 1 for
                    every head of a causal decoder (a check of the mask), the backward share of an
                    encoder's head
* ``induction``     mean, over the rows i whose token occurred earlier, of the mass on the keys j that
                    *follow* an earlier occurrence (token[j-1] == token[i], j < i): the induction-head
                    pattern "... A B ... A -> B" (Olsson et al. 2022); needs the token ids, rows without
                    an earlier occurrence do not count
* ``dilated``       max over dilations d = 2 .. ``max_dilation`` (default 8) of the mean over rows of the
                    mass on the keys j = i + k d, 1 <= |k| <= w (the same window w as ``local``; the
                    token itself excluded): Longformer's dilated sliding window (Beltagy et al. 2020,
                    sec. 3.1) read as a score. 1 for a head that attends only at distances d, 2d (for
                    one d >= 2); 0 for the diagonal and previous-token heads; 4/n for uniform rows
                    (w = 2); a local head (uniform in |i - j| <= 2) scores 2/5 at d = 2, so read it with
                    ``local``
* ``dilation``      the d >= 2 at which ``dilated`` is reached (the smallest one on ties)

Several sequences are pooled by weighting each sequence by its number of rows (n, or n - 1 for
``previous``, the rows with an earlier occurrence for ``induction``), i.e. every real query row of
the corpus counts once.

Reference patterns (:func:`reference_patterns`), row-stochastic n x n matrices: ``uniform``,
``diagonal`` (self), ``previous`` (token i -> i-1; the first token -> itself), ``local`` (uniform
in the window |i - j| <= w), ``global`` (every token -> the global tokens, default the special
ones; global tokens -> everything, BigBird-style), ``causal`` (uniform over j <= i), ``dilated``
(uniform over j = i + k d, |k| <= w, Longformer's dilated window).
"""

from __future__ import annotations

import numpy as np

from vitlens.errors import UsageError

STATS = ("entropy", "entropy_norm", "distance", "special", "cls", "sep", "local", "previous", "global", "causal",
         "induction", "dilated", "dilation")
#: dilations d = 2 .. MAX_DILATION searched by the ``dilated`` score
MAX_DILATION = 8
#: the statistics shown in the heatmap figure
SHOWN = ("entropy_norm", "distance", "special", "local", "previous", "global", "induction", "dilated")
PATTERNS = ("uniform", "diagonal", "previous", "local", "global", "causal", "dilated")


def _as_mask(values, n, default_positions=()):
    if values is None:
        mask = np.zeros(n, dtype=bool)
        for p in default_positions:
            if -n <= p < n:
                mask[p] = True
        return mask
    mask = np.asarray(values, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"token mask of shape {mask.shape} for {n} tokens")
    return mask


def induction_targets(ids) -> np.ndarray:
    """(n, n) bool: key j is an induction target of query i (j < i and token[j - 1] == token[i])."""
    ids = np.asarray(ids).reshape(-1)
    n = ids.shape[0]
    targets = np.zeros((n, n), dtype=bool)
    if n > 2:
        same = ids[None, :-1] == ids[:, None]  # (i, j-1): token j-1 equals token i
        targets[:, 1:] = same
    return targets & (np.arange(n)[None, :] < np.arange(n)[:, None])


def dilation_masks(n: int, window: int = 2, max_dilation: int = MAX_DILATION) -> np.ndarray:
    """(D, n, n) bool, D = max_dilation - 1: key j is at offset k d from query i, 1 <= |k| <= window, for
    d = 2 .. max_dilation (the keys a dilated sliding window of dilation d reads, the token itself excluded)."""
    i = np.arange(n)
    offset = i[None, :] - i[:, None]
    masks = []
    for d in range(2, max(max_dilation, 2) + 1):
        masks.append((offset != 0) & (offset % d == 0) & (np.abs(offset) <= window * d))
    return np.stack(masks)


def sequence_sums(attention, special=None, cls=None, sep=None, window: int = 2, ids=None,
                  max_dilation: int = MAX_DILATION) -> tuple[dict, dict]:
    """Row sums of every statistic for one sequence, and the row counts they average over.

    Parameters
    ----------
    attention : array (L, H, n, n) or (H, n, n) or (n, n)
        Attention of the real tokens only (rows sum to 1).
    special, cls, sep : bool arrays (n,), optional
        Default: no special tokens; ``cls`` defaults to none, ``sep`` to none.
    ids : int array (n,), optional
        Token ids, for ``induction`` (without them it counts no rows).
    """
    a = _as_array(attention)
    if a.ndim > 4 or a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise UsageError(f"one sequence's attention must be (L, H, n, n), (H, n, n) or (n, n), got shape "
                         f"{tuple(a.shape)}")
    while a.ndim < 4:
        a = a[None]
    n = a.shape[-1]
    special = _as_mask(special, n)
    cls = _as_mask(cls, n)
    sep = _as_mask(sep, n)
    i = np.arange(n)
    dist = np.abs(i[:, None] - i[None, :]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    row_entropy = -plogp.sum(-1)  # (L, H, n)
    sums = {
        "entropy": row_entropy.sum(-1),
        "entropy_norm": row_entropy.sum(-1) / np.log(n) if n > 1 else np.zeros(a.shape[:2]),
        "distance": (a * dist).sum((-1, -2)),
        "special": a[..., special].sum((-1, -2)),
        "cls": a[..., cls].sum((-1, -2)),
        "sep": a[..., sep].sum((-1, -2)),
        "local": (a * (dist <= window)).sum((-1, -2)),
        "previous": a[..., i[1:], i[:-1]].sum(-1) if n > 1 else np.zeros(a.shape[:2]),
        "global": a.mean(-2).max(-1) * n,  # per-sequence value, weighted by n rows like the others
        "causal": (a * (i[None, :] <= i[:, None])).sum((-1, -2)),
    }
    counts = {name: float(n) for name in STATS}
    counts["previous"] = float(max(n - 1, 0))
    if ids is not None and len(ids) == n:
        targets = induction_targets(ids)
        sums["induction"] = (a * targets).sum((-1, -2))
        counts["induction"] = float(targets.any(-1).sum())
    else:
        sums["induction"] = np.zeros(a.shape[:2])
        counts["induction"] = 0.0
    # per dilation d: (L, H, D) row sums; the max over d is taken after pooling (HeadStatistics.result)
    sums["dilated"] = np.einsum("lhij,dij->lhd", a, dilation_masks(n, window, max_dilation).astype(np.float64))
    sums["dilation"] = np.zeros(a.shape[:2])
    return sums, counts


class HeadStatistics:
    """Accumulates per-head statistics over sequences (every real query row counts once)."""

    def __init__(self, window: int = 2):
        self.window = window
        self.sums: dict = {}
        self.counts: dict = {name: 0.0 for name in STATS}
        self.sequences = 0

    def add(self, attention, special=None, cls=None, sep=None, ids=None) -> "HeadStatistics":
        sums, counts = sequence_sums(attention, special, cls, sep, self.window, ids)
        for name in STATS:
            self.sums[name] = self.sums.get(name, 0.0) + sums[name]
            self.counts[name] += counts[name]
        self.sequences += 1
        return self

    def result(self) -> dict:
        """stat name -> (L, H) array of means."""
        if not self.sequences:
            raise ValueError("no sequences added")
        out = {name: np.asarray(self.sums[name]) / self.counts[name] if self.counts[name] else
               np.zeros_like(np.asarray(self.sums[name])) for name in STATS}
        by_dilation = out["dilated"]  # (L, H, D): mean mass at dilation d = 2 + index
        out["dilated"] = by_dilation.max(-1)
        out["dilation"] = (by_dilation.argmax(-1) + 2).astype(np.float64)
        return out


def head_statistics(attentions, special=None, cls=None, sep=None, window: int = 2, ids=None,
                    attention_mask=None, layout: str | None = None) -> dict:
    """Per-head statistics of attention given in any of the usual forms; stat name -> (L, H) array.

    ``attentions`` is one of

    * Hugging Face's ``outputs.attentions``: a **tuple** with one (B, H, N, N) tensor per layer (or a
      list with ``layout='layers'``), or those layers stacked, (L, B, H, N, N); the B sequences are
      pooled (rows of padding removed with ``attention_mask`` (B, N), else every position is a token);
    * one sequence, (L, H, n, n) (an (H, n, n) or (n, n) array is one layer / one head);
    * a **list** of sequences, each (L, H, n_s, n_s) (``layout='sequences'``; lengths may differ).

    A list of equal-shaped 4-D arrays could be either layers or sequences: it is refused unless
    ``layout`` says which. Tensors of any float dtype (bf16 included) are read as float64.
    ``special``/``cls``/``sep``/``ids`` are one mask (id list) per sequence (or one for a single one).
    """
    if layout not in (None, "layers", "sequences"):
        raise UsageError(f"layout must be 'layers' or 'sequences', got {layout!r}")
    sequences, single = _sequences(attentions, layout, attention_mask)
    if single:  # one sequence: the masks and ids are its own
        special, cls, sep, ids = [special], [cls], [sep], [ids]
    acc = HeadStatistics(window)
    count = len(sequences)
    special = special if special is not None else [None] * count
    cls = cls if cls is not None else [None] * count
    sep = sep if sep is not None else [None] * count
    ids = ids if ids is not None else [None] * count
    for a, sp, c, s, t in zip(sequences, special, cls, sep, ids):
        acc.add(a, sp, c, s, t)
    return acc.result()


def _as_array(values) -> np.ndarray:
    """A numpy float64 array of a tensor (any dtype, any device; bf16 included) or an array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _sequences(attentions, layout, attention_mask) -> tuple[list, bool]:
    """The forms :func:`head_statistics` accepts -> (a list of (L, H, n, n) arrays, one per sequence;
    whether the input was one sequence)."""
    if isinstance(attentions, (tuple, list)):
        if not attentions:
            raise UsageError("no attention given")
        arrays = [_as_array(a) for a in attentions]
        shapes = {a.shape for a in arrays}
        if layout is None:
            if isinstance(attentions, tuple):
                layout = "layers"  # Hugging Face's outputs.attentions
            elif len(shapes) > 1 or arrays[0].ndim != 4:
                layout = "sequences"
            else:
                raise UsageError(f"a list of {len(arrays)} arrays of shape {arrays[0].shape} is ambiguous: pass "
                                 "layout='layers' (one (B, H, N, N) per layer, as Hugging Face's outputs.attentions) "
                                 "or layout='sequences' (one (L, H, n, n) per sequence)")
        if layout == "sequences":
            return arrays, False
        if len(shapes) > 1 or arrays[0].ndim != 4:
            raise UsageError("attention layers must all be (B, H, N, N), got shapes "
                             + ", ".join(str(tuple(s)) for s in sorted(shapes)))
        stacked = np.stack(arrays)  # (L, B, H, N, N)
    else:
        stacked = _as_array(attentions)
        if layout == "sequences":
            raise UsageError("layout='sequences' needs a list with one (L, H, n, n) array per sequence")
        if stacked.ndim <= 4 and layout != "layers":
            return [stacked], True
        if stacked.ndim != 5:
            raise UsageError(f"attention of shape {tuple(stacked.shape)}: expected (L, B, H, N, N) stacked layers, "
                             "(L, H, n, n) for one sequence, or a tuple of (B, H, N, N) layers")
    if stacked.shape[-1] != stacked.shape[-2]:
        raise UsageError(f"attention of shape {tuple(stacked.shape)} is not square in its last two dimensions")
    batch = stacked.shape[1]
    if attention_mask is None:
        return [stacked[:, b] for b in range(batch)], batch == 1
    mask = _as_array(attention_mask).astype(bool)
    if mask.shape != (batch, stacked.shape[-1]):
        raise UsageError(f"attention_mask of shape {mask.shape} for {batch} sequences of {stacked.shape[-1]} tokens")
    return [stacked[:, b][..., mask[b], :][..., mask[b]] for b in range(batch)], batch == 1


def stats_rows(stats: dict) -> list:
    """[{layer, head, stat: value, ...}] for a table (CSV / JSON)."""
    layers, heads = stats[STATS[0]].shape
    return [{"layer": l, "head": h, **{name: float(stats[name][l, h]) for name in STATS}}
            for l in range(layers) for h in range(heads)]


def reference_patterns(n: int, window: int = 2, dilation: int = 3, global_tokens=None) -> dict:
    """Synthetic row-stochastic (n, n) attention patterns with known statistics."""
    if n < 1:
        raise ValueError("n must be >= 1")
    i = np.arange(n)
    offset = i[None, :] - i[:, None]
    patterns = {
        "uniform": np.full((n, n), 1.0 / n),
        "diagonal": np.eye(n),
        "previous": np.eye(n, k=-1) + np.diag([1.0] + [0.0] * (n - 1)),
        "local": (np.abs(offset) <= window).astype(np.float64),
        "causal": (offset <= 0).astype(np.float64),
        "dilated": ((np.abs(offset) <= window * dilation) & (offset % dilation == 0)).astype(np.float64),
    }
    glob = np.zeros((n, n))
    tokens = sorted({int(t) % n for t in (global_tokens if global_tokens is not None else (0,))})
    glob[:, tokens] = 1.0
    glob[tokens, :] = 1.0
    patterns["global"] = glob
    return {name: m / m.sum(-1, keepdims=True) for name, m in ((p, patterns[p]) for p in PATTERNS)}


def reference_statistics(n: int, special=None, cls=None, sep=None, window: int = 2, dilation: int = 3) -> dict:
    """pattern name -> {stat: value} for the reference patterns at length n.

    The global pattern's global tokens are the special tokens when given (else the first token).
    """
    special_mask = _as_mask(special, n)
    global_tokens = np.flatnonzero(special_mask).tolist() or [0]
    out = {}
    for name, pattern in reference_patterns(n, window, dilation, global_tokens).items():
        stats = head_statistics(pattern[None, None], special_mask, cls, sep, window)  # one sequence
        out[name] = {stat: float(stats[stat][0, 0]) for stat in STATS}
    return out


def induction_pattern(ids) -> np.ndarray:
    """A synthetic induction head for these token ids: each row uniform over its induction targets
    (the tokens that followed an earlier occurrence of the current token), rows without any on the
    first token (an attention sink). Row-stochastic and causal."""
    targets = induction_targets(ids).astype(np.float64)
    empty = targets.sum(-1) == 0
    targets[empty, 0] = 1.0
    return targets / targets.sum(-1, keepdims=True)


__all__ = ["HeadStatistics", "MAX_DILATION", "PATTERNS", "SHOWN", "STATS", "dilation_masks", "head_statistics",
           "induction_pattern", "induction_targets", "reference_patterns", "reference_statistics", "sequence_sums",
           "stats_rows"]
