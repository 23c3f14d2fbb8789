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

STATS = ("entropy", "entropy_norm", "distance", "special", "cls", "sep", "local", "previous", "global", "causal",
         "induction")
#: the statistics shown in the heatmap figure
SHOWN = ("entropy_norm", "distance", "special", "local", "previous", "global", "induction")
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


def sequence_sums(attention, special=None, cls=None, sep=None, window: int = 2, ids=None) -> tuple[dict, dict]:
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
    a = np.asarray(attention, dtype=np.float64)
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
        return {name: np.asarray(self.sums[name]) / self.counts[name] if self.counts[name] else
                np.zeros_like(np.asarray(self.sums[name])) for name in STATS}


def head_statistics(attentions, special=None, cls=None, sep=None, window: int = 2, ids=None) -> dict:
    """Statistics of one sequence (an (L, H, n, n) array) or of a list of sequences.

    ``special``/``cls``/``sep``/``ids`` are one mask (id list) per sequence (or one for a single array).
    Returns stat name -> (L, H) array.
    """
    if isinstance(attentions, np.ndarray) or hasattr(attentions, "shape"):
        attentions, special, cls, sep, ids = [attentions], [special], [cls], [sep], [ids]
    acc = HeadStatistics(window)
    count = len(attentions)
    special = special if special is not None else [None] * count
    cls = cls if cls is not None else [None] * count
    sep = sep if sep is not None else [None] * count
    ids = ids if ids is not None else [None] * count
    for a, sp, c, s, t in zip(attentions, special, cls, sep, ids):
        acc.add(np.asarray(a), sp, c, s, t)
    return acc.result()


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
        stats = head_statistics(pattern[None, None], special_mask, cls, sep, window)
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


__all__ = ["HeadStatistics", "PATTERNS", "SHOWN", "STATS", "head_statistics", "induction_pattern", "induction_targets",
           "reference_patterns", "reference_statistics", "sequence_sums", "stats_rows"]
