"""Per-head statistics on synthetic attention patterns with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitlens.text.stats import (STATS, HeadStatistics, head_statistics, reference_patterns, reference_statistics,
                                stats_rows)

N = 8


def _stats(pattern, **kwargs):
    out = head_statistics(np.asarray(pattern)[None, None], **kwargs)
    return {name: float(value[0, 0]) for name, value in out.items()}


def test_patterns_are_row_stochastic():
    for name, pattern in reference_patterns(N, window=2, dilation=3).items():
        assert pattern.shape == (N, N), name
        assert np.allclose(pattern.sum(-1), 1.0), name
        assert (pattern >= 0).all(), name


def test_uniform_rows_have_maximal_entropy():
    patterns = reference_patterns(N)
    uniform = _stats(patterns["uniform"])
    assert uniform["entropy"] == pytest.approx(math.log(N))
    assert uniform["entropy_norm"] == pytest.approx(1.0)
    for name, pattern in patterns.items():  # nothing beats uniform
        assert _stats(pattern)["entropy"] <= uniform["entropy"] + 1e-12, name
    # mean |i - j| under uniform attention: (n^2 - 1) / (3 n)
    assert uniform["distance"] == pytest.approx((N * N - 1) / (3 * N))
    assert uniform["global"] == pytest.approx(1 / N)


def test_diagonal_has_distance_zero_and_no_entropy():
    diagonal = _stats(reference_patterns(N)["diagonal"])
    assert diagonal["distance"] == 0.0
    assert diagonal["entropy"] == 0.0 and diagonal["entropy_norm"] == 0.0
    assert diagonal["local"] == 1.0 and diagonal["previous"] == 0.0
    assert diagonal["global"] == pytest.approx(1 / N)


def test_previous_token_pattern():
    previous = _stats(reference_patterns(N)["previous"])
    assert previous["previous"] == pytest.approx(1.0)
    assert previous["distance"] == pytest.approx((N - 1) / N)  # the first token attends to itself
    assert previous["entropy"] == 0.0 and previous["local"] == 1.0


def test_local_window_and_dilated_window():
    local = _stats(reference_patterns(N, window=1)["local"], window=1)
    assert local["local"] == pytest.approx(1.0)
    assert local["distance"] < 1.0
    dilated = reference_patterns(N, window=1, dilation=3)["dilated"]
    stats = _stats(dilated, window=1)
    # offsets {-3, 0, 3}: only the diagonal lies in the window |i - j| <= 1
    allowed = [len([j for j in (i - 3, i, i + 3) if 0 <= j < N]) for i in range(N)]
    assert stats["local"] == pytest.approx(np.mean([1 / a for a in allowed]))
    assert stats["previous"] == 0.0


def test_global_pattern_and_special_tokens():
    special = np.zeros(N, dtype=bool)
    special[[0, N - 1]] = True
    cls = np.arange(N) == 0
    sep = np.arange(N) == N - 1
    pattern = reference_patterns(N, global_tokens=[0, N - 1])["global"]
    stats = _stats(pattern, special=special, cls=cls, sep=sep)
    # the N - 2 ordinary rows put everything on the two special tokens, the 2 global rows spread out
    assert stats["special"] == pytest.approx(((N - 2) * 1.0 + 2 * (2 / N)) / N)
    assert stats["cls"] == pytest.approx(stats["sep"])
    assert stats["cls"] + stats["sep"] == pytest.approx(stats["special"])
    all_to_cls = np.zeros((N, N))
    all_to_cls[:, 0] = 1.0
    vertical = _stats(all_to_cls, special=special, cls=cls, sep=sep)
    assert vertical["global"] == 1.0 and vertical["cls"] == 1.0 and vertical["sep"] == 0.0


def test_causal_pattern_entropy():
    causal = _stats(reference_patterns(N)["causal"])
    assert causal["entropy"] == pytest.approx(np.mean([math.log(i + 1) for i in range(N)]))
    assert causal["previous"] == pytest.approx(np.mean([1 / (i + 1) for i in range(1, N)]))


def test_sequences_pool_by_rows_and_tables_have_every_head():
    patterns = reference_patterns(4)
    long_patterns = reference_patterns(12)
    a = np.stack([np.stack([patterns["diagonal"], patterns["uniform"]])])  # (1 layer, 2 heads, 4, 4)
    b = np.stack([np.stack([long_patterns["diagonal"], long_patterns["uniform"]])])
    acc = HeadStatistics().add(a).add(b)
    pooled = acc.result()
    assert pooled["entropy"].shape == (1, 2)
    assert pooled["distance"][0, 0] == 0.0
    # every real query row counts once: (4 ln 4 + 12 ln 12) / 16
    assert pooled["entropy"][0, 1] == pytest.approx((4 * math.log(4) + 12 * math.log(12)) / 16)
    rows = stats_rows(pooled)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1)]
    assert set(STATS) <= set(rows[0])


def test_reference_statistics_distinguish_the_patterns():
    ref = reference_statistics(10, special=[True] + [False] * 8 + [True])
    assert ref["uniform"]["entropy_norm"] == pytest.approx(1.0)
    assert ref["diagonal"]["distance"] == 0.0
    assert ref["previous"]["previous"] == pytest.approx(1.0)
    assert ref["global"]["special"] > 0.8
    assert ref["local"]["local"] == pytest.approx(1.0)
    assert max(ref, key=lambda p: ref[p]["distance"]) == "global"


def test_statistics_identify_a_previous_token_head_and_an_induction_head():
    """A synthetic decoder layer on a repeated random sequence (BOS, A B C ... , A B C ...): head 0 attends to
    the previous token, head 1 is an induction head (to the token after the current token's earlier copy),
    head 2 is uniform over the past (the causal reference pattern), head 3 sits on the first token (a sink)."""
    from vitlens.text.stats import induction_pattern, induction_targets

    rng = np.random.default_rng(0)
    half = rng.permutation(np.arange(10, 60))[:12]
    ids = np.concatenate([[1], half, half])  # BOS + two copies: 25 tokens
    n = ids.size
    patterns = reference_patterns(n)
    sink = np.zeros((n, n))
    sink[:, 0] = 1.0
    heads = np.stack([patterns["previous"], induction_pattern(ids), patterns["causal"], sink])
    assert np.allclose(np.triu(heads, 1), 0) and np.allclose(heads.sum(-1), 1)
    stats = head_statistics(heads[None], special=[True] + [False] * (n - 1), ids=ids)
    previous, induction, causal = stats["previous"][0], stats["induction"][0], stats["causal"][0]
    assert int(np.argmax(previous)) == 0 and previous[0] == pytest.approx(1.0)
    assert int(np.argmax(induction)) == 1 and induction[1] == pytest.approx(1.0)
    assert induction[0] < 0.1 and previous[1] < 0.1  # the two are told apart
    # every row of the second copy (12 rows) has exactly one induction target: the key after its first copy
    targets = induction_targets(ids)
    assert targets.sum() == 12 and all(targets[13 + k, 2 + k] for k in range(12))
    assert np.allclose(causal, 1.0)  # every head is causal
    assert stats["special"][0, 3] == pytest.approx(1.0)  # the sink head is on BOS
    # without token ids no row counts for induction; an encoder's uniform head looks at the past only half the time
    assert head_statistics(heads[None])["induction"][0, 1] == 0
    assert _stats(patterns["uniform"])["causal"] == pytest.approx((n + 1) / (2 * n))


# ------------------------------------------------------------------------------------------ dilated heads
def _dilated_head(n: int, d: int, window: int = 2) -> np.ndarray:
    """Uniform over the keys i + k d, 1 <= |k| <= window (the token itself when it has none)."""
    a = np.zeros((n, n))
    for i in range(n):
        keys = [i + k * d for k in range(-window, window + 1) if k and 0 <= i + k * d < n]
        a[i, keys or [i]] = 1.0 / max(len(keys), 1)
    return a


@pytest.mark.parametrize("d", [2, 3, 5])
def test_dilated_score_finds_the_dilation_of_a_dilated_head(d):
    n = 24
    stats = _stats(_dilated_head(n, d))
    assert stats["dilated"] == pytest.approx(1.0)
    assert stats["dilation"] == d
    # a dilated head is not local (for d >= 3 none of its keys lies within |i - j| <= 2)
    if d >= 3:
        assert stats["local"] == 0.0


def test_dilated_score_of_the_other_patterns():
    n = 16
    patterns = reference_patterns(n)
    assert _stats(patterns["diagonal"])["dilated"] == 0.0
    assert _stats(patterns["previous"])["dilated"] == 0.0
    # uniform rows: the share of keys at offsets +-2, +-4 (d = 2 has the most keys inside the sequence)
    expected = np.mean([sum(0 <= i + o < n for o in (-4, -2, 2, 4)) / n for i in range(n)])
    uniform = _stats(patterns["uniform"])
    assert uniform["dilated"] == pytest.approx(expected) and uniform["dilation"] == 2
    # the Longformer reference (offsets k * 3, |k| <= 2, itself included): all but the self share
    ref = _stats(patterns["dilated"])
    own = np.mean([1 / sum(0 <= i + 3 * k < n for k in range(-2, 3)) for i in range(n)])
    assert ref["dilation"] == 3 and ref["dilated"] == pytest.approx(1 - own)


def test_dilated_pools_sequences_before_choosing_the_dilation():
    """Two sequences dilated at 2 and 3: the pooled score is the best single d over all rows, not a mix."""
    a, b = _dilated_head(12, 2), _dilated_head(20, 3)
    pooled = HeadStatistics().add(a[None, None]).add(b[None, None]).result()
    per_d = {d: (HeadStatistics().add(a[None, None]).result(), HeadStatistics().add(b[None, None]).result())
             for d in (2, 3)}
    assert pooled["dilation"][0, 0] == 3  # 20 rows at d = 3 outweigh 12 at d = 2
    assert per_d[2][0]["dilated"][0, 0] == pytest.approx(1.0)
    # at d = 3 sequence a (dilation 2) puts its mass at offsets +-6 only
    mass_a_at_3 = np.mean([sum(a[i, j] for j in range(12) if j != i and (j - i) % 3 == 0 and abs(j - i) <= 6)
                           for i in range(12)])
    assert pooled["dilated"][0, 0] == pytest.approx((12 * mass_a_at_3 + 20 * 1.0) / 32)


# ------------------------------------------------------------------------------------------ input forms
def test_hugging_face_attentions_tuple_gives_one_row_per_layer():
    """outputs.attentions of a real model (a tuple of (B, H, N, N) per layer) is read per layer, not averaged."""
    import torch

    from tests.text.conftest import left_padded_batch, tiny_decoder

    module = tiny_decoder("gpt2")
    module.config._attn_implementation = "eager"  # HF returns its probabilities only from eager attention
    ids, mask = left_padded_batch((6, 4))
    with torch.no_grad():
        out = module(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert isinstance(out.attentions, tuple) and len(out.attentions) == 2
    stats = head_statistics(out.attentions, attention_mask=mask)
    assert stats["entropy"].shape == (2, 4)
    # the same as the per-sequence form with the padding cut out
    per_seq = [torch.stack([a[b] for a in out.attentions])[..., mask[b].bool(), :][..., mask[b].bool()]
               for b in range(2)]
    expected = head_statistics([p.numpy() for p in per_seq], layout="sequences")
    for name in STATS:
        np.testing.assert_allclose(stats[name], expected[name], atol=1e-12, err_msg=name)
    # stacked layers (L, B, H, N, N) and a list with layout='layers' are the same thing
    np.testing.assert_allclose(head_statistics(torch.stack(out.attentions), attention_mask=mask)["entropy"],
                               stats["entropy"])
    np.testing.assert_allclose(head_statistics(list(out.attentions), attention_mask=mask, layout="layers")["entropy"],
                               stats["entropy"])
    # every decoder head is causal: a check that the padding rows were removed (padded rows are not)
    np.testing.assert_allclose(stats["causal"], 1.0, atol=1e-6)


def test_ambiguous_and_malformed_shapes_are_refused_in_one_line():
    from vitlens.errors import UsageError

    same = [np.full((2, 3, 5, 5), 0.2)] * 4
    with pytest.raises(UsageError, match="is ambiguous: pass layout='layers'") as info:
        head_statistics(same)
    assert "\n" not in str(info.value)
    assert head_statistics(same, layout="sequences")["entropy"].shape == (2, 3)
    assert head_statistics(same, layout="layers")["entropy"].shape == (4, 3)
    with pytest.raises(UsageError, match="must all be"):
        head_statistics((np.full((1, 3, 5, 5), 0.2), np.full((1, 3, 4, 4), 0.25)))
    with pytest.raises(UsageError, match="expected"):
        head_statistics(np.zeros((1, 1, 1, 3, 5, 5)))
    with pytest.raises(UsageError, match="not square"):
        head_statistics(np.zeros((2, 1, 3, 5, 4)))
