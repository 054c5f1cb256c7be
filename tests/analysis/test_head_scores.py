"""Head scores: hand-built patterns with known answers, the model's own eager attention scored by an
independent, loop-by-loop transcription of TransformerLens's head detector ("mul"), and TransformerLens itself
(detect_head and run_with_cache through its TransformerBridge, on a sentence and on the induction probe)."""

import importlib
import json
import re
from itertools import product

import numpy as np
import pytest
import torch
from transformer_lens.head_detector import detect_head

from analysis import (
    AnalysisResult,
    HeadscopeError,
    analyze,
    analyze_ids,
    analyze_induction_probe,
    capture,
    capture_ids,
    induction_probe_ids,
    summarize,
)
from analysis.head_scores import HEAD_SCORES, compute_head_scores
from analysis.metrics import compute_centered_dot_products, compute_dot_products, compute_mannwhitney
from analysis.results import HEAD_SCORE_NAMES
from tests.conftest import FIJI, REPEATS
from tests.reference import (
    assert_rank_statistics_close,
    compute_duplicate_token_pattern,
    compute_duplicate_token_score,
    compute_entropy_score,
    compute_induction_pattern,
    compute_induction_score,
    compute_previous_token_score,
    compute_row_entropy,
    compute_self_score,
    compute_sink_score,
)

N_HEADS, N_POS = 3, 9
OPTIONS = list(product([False, True], repeat=2))  # (exclude_bos, exclude_current_token)
DETECTION = ("previous_token", "duplicate_token", "induction")


# ---- an independent transcription of TransformerLens's head detector, loops and all -----------------------------

def tl_detection_pattern(name: str, ids) -> np.ndarray:
    n = len(ids)
    duplicate = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if ids[i] == ids[j] and i != j:  # np.fill_diagonal(eq_mask, 0)
                duplicate[i, j] = 1
    duplicate = np.tril(duplicate)
    if name == "duplicate_token":
        return duplicate
    if name == "previous_token":
        previous = np.zeros((n, n))
        for i in range(1, n):
            previous[i, i - 1] = 1
        return previous
    shifted = np.roll(duplicate, 1, axis=1)  # torch.roll(shifts=1, dims=1)
    shifted[:, 0] = 0  # "replace first column with 0's"
    return np.tril(shifted)


def loop_detection_pattern(name: str, ids, causal: bool) -> np.ndarray:
    """The definition, loop by loop: the copies of the query's token that it sees are the other positions j != i of
    its token, j < i on a causal model (its mask), any j on an encoder; induction: the position after each, if any."""
    n = len(ids)
    pattern = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if name == "previous_token" and j == i - 1:
                pattern[i, j] = 1
            seen = j != i and ids[j] == ids[i] and (j < i or not causal)
            if name == "duplicate_token" and seen:
                pattern[i, j] = 1
            if name == "induction" and seen and j + 1 < n:
                pattern[i, j + 1] = 1
    return pattern


def definition_scores(patterns, ids, exclude_bos, exclude_current_token, causal) -> dict[str, np.ndarray]:
    """{name: [layer, head]} from a list of [head, q_pos, k_pos] patterns, by loop_detection_pattern."""
    return {name: np.array([[tl_mul_score(head, loop_detection_pattern(name, ids, causal), exclude_bos,
                                          exclude_current_token) for head in layer] for layer in patterns])
            for name in DETECTION}


def tl_mul_score(pattern: np.ndarray, detection: np.ndarray, exclude_bos: bool, exclude_current_token: bool) -> float:
    a = np.array(pattern, dtype=np.float64)  # TransformerLens writes into its argument; we write into a copy
    if exclude_bos:
        a[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(a, 0)
    return float((a * detection).sum() / a.sum())


def tl_scores(patterns, ids, exclude_bos, exclude_current_token) -> dict[str, np.ndarray]:
    """{name: [layer, head]} from a list of [head, q_pos, k_pos] patterns."""
    return {name: np.array([[tl_mul_score(head, tl_detection_pattern(name, ids), exclude_bos, exclude_current_token)
                             for head in layer] for layer in patterns]) for name in DETECTION}


def loop_pattern_scores(patterns) -> dict[str, np.ndarray]:
    out = {"sink": [], "self": [], "entropy": []}
    for layer in patterns:
        sink, self_, entropy = [], [], []
        for head in layer.astype(np.float64):
            n = head.shape[0]
            sink.append(sum(head[i, 0] for i in range(1, n)) / (n - 1))
            self_.append(sum(head[i, i] for i in range(1, n)) / (n - 1))
            entropy.append(sum(-sum(p * np.log(p) for p in head[i] if p > 0) for i in range(1, n)) / (n - 1))
        out["sink"].append(sink)
        out["self"].append(self_)
        out["entropy"].append(entropy)
    return {name: np.array(values) for name, values in out.items()}


# ---- hand-built patterns -------------------------------------------------------------------------------------------

def previous_token_pattern() -> np.ndarray:
    """Every query attends to the previous token; the first can only attend to itself."""
    pattern = np.zeros((N_HEADS, N_POS, N_POS), dtype=np.float32)
    pattern[:, 0, 0] = 1
    pattern[:, np.arange(1, N_POS), np.arange(N_POS - 1)] = 1
    return pattern


def uniform_causal_pattern(n_heads=N_HEADS, n=N_POS) -> np.ndarray:
    causal = np.tril(np.ones((n, n)))  # [q_pos, k_pos]
    return np.broadcast_to(causal / causal.sum(axis=1, keepdims=True), (n_heads, n, n)).astype(np.float32)


def random_causal_pattern(rng, n_heads=N_HEADS, n=N_POS, causal=True) -> np.ndarray:
    scores = rng.normal(size=(n_heads, n, n)) * 3  # [head, q_pos, k_pos]
    if causal:
        scores = np.where(np.tril(np.ones((n, n))) > 0, scores, -np.inf)
    pattern = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (pattern / pattern.sum(axis=-1, keepdims=True)).astype(np.float32)


REPEATED_IDS = np.array([5, 7, 7, 2, 9, 5, 7, 7, 2])  # repeats, including adjacent ones (7, 7)


def both_routes(patterns, ids, exclude_bos, exclude_current_token, causal=True) -> list[dict[str, np.ndarray]]:
    """The readable numpy definitions and the fast route the recorder runs."""
    dense = {
        "previous_token": compute_previous_token_score(patterns, exclude_bos, exclude_current_token),
        "duplicate_token": compute_duplicate_token_score(patterns, ids, exclude_bos, exclude_current_token, causal),
        "induction": compute_induction_score(patterns, ids, exclude_bos, exclude_current_token, causal),
        "sink": compute_sink_score(patterns), "self": compute_self_score(patterns),
        "entropy": compute_entropy_score(patterns),
    }
    return [dense, compute_head_scores(patterns, ids, exclude_bos, exclude_current_token, causal)]


def test_score_names_agree_between_the_engine_and_the_results():
    assert HEAD_SCORES == HEAD_SCORE_NAMES


def test_duplicate_pairs_are_the_lower_triangle_of_equal_tokens():
    """head_scores.duplicate_pairs (from the positions sorted by token) against the dense T x T comparison, in its
    order (by query, then key), on texts from all-distinct to one token repeated."""
    from analysis.head_scores import duplicate_pairs

    rng = np.random.default_rng(0)
    for n, vocab in [(0, 5), (1, 5), (2, 1), (7, 2), (50, 3), (300, 20), (400, 1), (500, 10**6)]:
        ids = rng.integers(0, vocab, n)  # [pos]
        want = np.nonzero(np.tril(ids[:, None] == ids[None, :], k=-1))  # [pair] each
        got = duplicate_pairs(ids)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), (n, vocab)
        assert got[0].dtype.kind == "i" and got[1].dtype.kind == "i"


def test_perfect_previous_token_pattern():
    pattern = previous_token_pattern()
    for scores in both_routes(pattern, np.arange(N_POS), False, False):
        np.testing.assert_allclose(scores["previous_token"], (N_POS - 1) / N_POS, rtol=1e-12)
    for scores in both_routes(pattern, np.arange(N_POS), True, False):
        assert np.all(scores["previous_token"] == 1.0)
    for scores in both_routes(pattern, np.arange(N_POS), True, True):
        assert np.all(scores["previous_token"] == 1.0)


def test_uniform_causal_pattern_entropy_is_log_of_the_row_length():
    pattern = uniform_causal_pattern()
    np.testing.assert_allclose(compute_row_entropy(pattern), np.log(np.arange(1, N_POS + 1))[None].repeat(N_HEADS, 0),
                               rtol=1e-6, atol=1e-7)
    expected = np.log(np.arange(2, N_POS + 1)).mean()  # rows 1..T-1: log(i + 1)
    for scores in both_routes(pattern, np.arange(N_POS), False, False):
        np.testing.assert_allclose(scores["entropy"], expected, rtol=1e-6)
        np.testing.assert_allclose(scores["sink"], np.mean(1 / np.arange(2, N_POS + 1)), rtol=1e-6)
        np.testing.assert_allclose(scores["self"], np.mean(1 / np.arange(2, N_POS + 1)), rtol=1e-6)


@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_the_induction_detection_pattern_scores_one(exclude_bos, exclude_current_token):
    pattern = np.broadcast_to(compute_induction_pattern(REPEATED_IDS), (N_HEADS, N_POS, N_POS)).astype(np.float32)
    assert pattern.sum() > 0 and np.trace(pattern[0]) > 0  # (7, 7) puts a 1 on the diagonal
    for scores in both_routes(pattern, REPEATED_IDS, exclude_bos, exclude_current_token):
        np.testing.assert_allclose(scores["induction"], 1.0, rtol=1e-12)
    np.testing.assert_array_equal(pattern[0], tl_detection_pattern("induction", REPEATED_IDS))


COPIES_IDS = np.array([5, 7, 2, 5, 7, 2, 5, 7, 2])  # every token three times: every query has other copies


def head_on(targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [head = 1, pos, d_head = pos] of a head that attends equally to the keys that `targets` [q_pos, k_pos]
    (0/1, at least one a row) marks and to nothing else: k_j is the j-th unit vector and q_i is 200 where row i marks
    (the other keys' weight, exp(-200) of it, is 0 in float32)."""
    q = torch.from_numpy(targets * 200.0).float()[None]  # [1, pos, d_head = pos]
    k = torch.eye(targets.shape[1])[None]  # [1, pos, d_head = pos]
    return q, k


def encoder_routes(q, k, ids, causal: bool, options=(False, False), pad: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """Every route's detection scores of one head, q, k [1, pos, d_head], without a mask (an encoder's): the dense
    one on the rebuilt pattern, the pass's blocks of rows (patterns.reduce_pattern, blocks of 4 rows) and a corpus
    pass's texts at once (batched), the text `pad` positions into a padded row. `options`: (exclude_bos,
    exclude_current_token)."""
    from analysis.batched import TextsPlan, reduce_scores_texts
    from analysis.head_scores import ScorePlan, combine_score_parts
    from analysis.patterns import reduce_pattern

    n, d = q.shape[1], q.shape[2]
    pattern = compute_pattern_of(q, k)  # [head, q_pos, k_pos]
    reduced = reduce_pattern(q[None], k[None], 1.0, None, None, ScorePlan.build(ids, causal=causal), 4 * 3 * 4 * n,
                             readouts=False, causal=False)
    width = n + 2 * pad
    padded_q, padded_k = torch.zeros(2, 1, 1, 1, width, d)  # [text, layer, head, W, d_head] each
    padded_q[0, 0, :, pad:pad + n], padded_k[0, 0, :, pad:pad + n] = q, k
    mask = torch.zeros(1, 1, width, width, dtype=torch.bool)  # [1, 1, W, W]: the text's keys only
    mask[..., pad:pad + n] = True
    plan = TextsPlan.build([(ids, (pad, pad + n), n - 1, None)], width, True, causal, q.device)
    parts, fixed = reduce_scores_texts(padded_q, padded_k, 1.0, mask, None, plan, 4 * 4 * width, causal=False)
    return {"dense": compute_head_scores(pattern, ids, *options, causal=causal),
            "in the pass": combine_score_parts(reduced.parts[0].numpy(), reduced.fixed[0].numpy(), *options),
            "at once": combine_score_parts(parts[0, 0].numpy(), fixed[0, 0].numpy(), *options)}


@pytest.mark.parametrize("name", ["duplicate_token", "induction"])
def test_an_encoder_head_on_every_other_copy_scores_one(name):
    """An encoder's head that attends only to the other copies of the query's token, on both sides (or only to the
    tokens right after them), is what the score detects: 1.0 on every route, as a causal model's head on its earlier
    copies scores. Counted over the earlier copies alone, as TransformerLens's causal patterns do, it scored 0.5 here
    as a duplicate-token head (the first copy's queries 0, the second's 1/2, the third's 1), 5/9 as an induction
    head."""
    targets = loop_detection_pattern(name, COPIES_IDS, causal=False)  # [q_pos, k_pos]: the definition, loop by loop
    assert targets.sum(axis=1).min() >= 1 and np.triu(targets, 1).sum() > 0  # every row has a target, later ones too
    q, k = head_on(targets)
    pattern = compute_pattern_of(q, k)
    np.testing.assert_array_equal(pattern[0] > 0, targets > 0)  # the head is the hand-built one
    for route, scores in encoder_routes(q, k, COPIES_IDS, causal=False).items():
        np.testing.assert_allclose(scores[name], 1.0, rtol=1e-12, err_msg=route)
    earlier_only = definition_scores([pattern], COPIES_IDS, False, False, causal=True)[name][0]
    assert earlier_only[0] < 0.75  # the earlier copies' definition misses a quarter or more of it
    for route, scores in encoder_routes(q, k, COPIES_IDS, causal=True).items():  # the causal pairs, as before
        np.testing.assert_allclose(scores[name], earlier_only, rtol=1e-6, err_msg=route)


def compute_pattern_of(q, k) -> np.ndarray:
    from analysis.metrics import compute_pattern

    return compute_pattern(q, k, 1.0, None, None).numpy()  # [head, q_pos, k_pos]


@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_an_encoders_routes_equal_the_definition_on_a_random_pattern(exclude_bos, exclude_current_token):
    """Random encoder heads (no mask), repeats on both sides of most queries, a copy at the last position (no token
    after it): every route against the loop-by-loop definition, every exclusion."""
    rng = np.random.default_rng(4)
    ids = np.array([3, 5, 3, 9, 5, 3, 7, 5, 3])  # the last position a copy: no successor there
    q, k = (torch.from_numpy(rng.normal(size=(1, ids.size, 6)) * 2).float() for _ in range(2))
    pattern = compute_pattern_of(q, k)
    expected = definition_scores([pattern], ids, exclude_bos, exclude_current_token, causal=False)
    for route, scores in encoder_routes(q, k, ids, False, (exclude_bos, exclude_current_token)).items():
        for name in DETECTION:
            np.testing.assert_allclose(scores[name], expected[name][0], rtol=1e-6, err_msg=f"{route} {name}")


@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_patterns_are_not_mutated(exclude_bos, exclude_current_token):
    pattern = random_causal_pattern(np.random.default_rng(0))
    before = pattern.copy()
    pattern.setflags(write=False)  # any write raises
    both_routes(pattern, REPEATED_IDS, exclude_bos, exclude_current_token)
    np.testing.assert_array_equal(pattern, before)
    weights = torch.from_numpy(before.copy())
    compute_head_scores(weights.numpy(), REPEATED_IDS, exclude_bos, exclude_current_token)
    assert torch.equal(weights, torch.from_numpy(before))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_both_routes_equal_the_transformer_lens_formula(causal, exclude_bos, exclude_current_token):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, size=N_POS)  # a small vocabulary: many repeats
    pattern = random_causal_pattern(rng, causal=causal)
    expected = tl_scores([pattern], ids, exclude_bos, exclude_current_token)
    expected = {name: values[0] for name, values in expected.items()}
    expected.update({name: values[0] for name, values in loop_pattern_scores([pattern]).items()})
    for scores in both_routes(pattern, ids, exclude_bos, exclude_current_token):
        for name in HEAD_SCORES:
            np.testing.assert_allclose(scores[name], expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
    # the definition by the model's attention: on a causal model TransformerLens's patterns; on an encoder every
    # other copy the query sees (later ones too)
    for name in DETECTION:
        assert np.array_equal(loop_detection_pattern(name, ids, True), tl_detection_pattern(name, ids)), name
    seen = {name: values[0] for name, values in definition_scores([pattern], ids, exclude_bos, exclude_current_token,
                                                                  causal).items()}
    for scores in both_routes(pattern, ids, exclude_bos, exclude_current_token, causal):
        for name in DETECTION:
            np.testing.assert_allclose(scores[name], seen[name], rtol=1e-6, atol=1e-9, err_msg=f"{name} seen")


def test_one_token_scores_are_undefined_not_zero():
    pattern = np.ones((N_HEADS, 1, 1), dtype=np.float32)
    for scores in both_routes(pattern, [3], True, False):
        assert all(np.isnan(scores[name]).all() for name in HEAD_SCORES)


def focused_head_qk(n: int, kind: str, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [head, pos, d_head = pos] float32 of a head whose every query puts all but ~1e-5 of its attention on key
    0 ("sink") or on itself ("self"), so with that key excluded the scores divide by a kept mass far below a float32
    row's rounding (~1e-7)."""
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, heads, n, n)) * 0.1
    if kind == "sink":
        q[..., 0], k[:, 0, 0] = 16.0, 1.0  # q.k0 = 16, q.kj ~ 16 * 0.1 * N(0, 1) for the others
    else:
        q[:, range(n), range(n)], k[:, range(n), range(n)] = 16.0, 1.0  # qi.ki = 16, qi.kj ~ N(0, 0.1^2) * 3.2
    return torch.from_numpy(q).float(), torch.from_numpy(k).float()


@pytest.mark.parametrize("kind", ["sink", "self"])
@pytest.mark.parametrize("n", [12, 2])
@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_a_focused_heads_scores_with_its_key_excluded_equal_the_transformer_lens_formula(exclude_bos,
                                                                                        exclude_current_token, n, kind):
    """The kept mass is a subtraction from every weight's sum: from a float32 row sum, or from the row count (each
    softmax row taken as 1), its rounding was ~1e-3 of the score here, and with two tokens and both exclusions
    (nothing kept: 0/0, NaN) a score of 0. Every route: the dense one (stored patterns), the pass's blocks of rows
    (patterns.reduce_pattern) and a corpus pass's texts at once (batched)."""
    from analysis.batched import TextsPlan, reduce_scores_texts
    from analysis.head_scores import ScorePlan, combine_score_parts
    from analysis.metrics import compute_pattern
    from analysis.patterns import reduce_pattern

    q, k = focused_head_qk(n, kind)
    ids = np.array([3, 5, 7, 5, 7, 9, 3, 5, 7, 2, 4, 6])[:n]  # repeats: duplicate and induction pairs
    causal = torch.full((1, n, n), torch.finfo(torch.float32).min).triu_(1)  # [1, q_pos, k_pos] additive
    pattern = compute_pattern(q, k, 1.0, causal).numpy()  # [head, q_pos, k_pos]: the rebuild every route makes
    focus = pattern[:, :, 0] if kind == "sink" else pattern.diagonal(axis1=1, axis2=2)  # [head, q_pos]
    assert (focus[:, 1:] > 1 - 1e-3).all()  # nearly all the attention of every later row there
    with np.errstate(invalid="ignore"):  # 0/0 where nothing is kept
        expected = {name: values[0] for name, values in tl_scores([pattern], ids, exclude_bos,
                                                                   exclude_current_token).items()}
    assert np.isnan(expected["previous_token"]).all() == (n == 2 and exclude_bos and exclude_current_token)
    reduced = reduce_pattern(q[None], k[None], 1.0, None, None, ScorePlan.build(ids), 2**12, readouts=False)
    in_pass = combine_score_parts(reduced.parts[0].numpy(), reduced.fixed[0].numpy(), exclude_bos,
                                  exclude_current_token)
    plan = TextsPlan.build([(ids, (0, n), n - 1, None)], n, True, True, q.device)
    parts, fixed = reduce_scores_texts(q[None, None], k[None, None], 1.0, None, None, plan, 2**12)
    at_once = combine_score_parts(parts[0, 0].numpy(), fixed[0, 0].numpy(), exclude_bos, exclude_current_token)
    dense = compute_head_scores(pattern, ids, exclude_bos, exclude_current_token)
    for route, scores in (("dense", dense), ("in the pass", in_pass), ("at once", at_once)):
        for name in DETECTION:
            np.testing.assert_allclose(scores[name], expected[name], rtol=1e-7, err_msg=f"{route} {name}")


# ---- the same-head vs different-head statistics --------------------------------------------------------------------

def test_mannwhitney_p_value_and_rank_biserial():
    from scipy.stats import mannwhitneyu

    same, diff = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0, 4.0])
    p, r = compute_mannwhitney(same, diff)
    assert r == 1.0 and p == pytest.approx(mannwhitneyu(same, diff).pvalue)
    assert compute_mannwhitney(diff, same)[1] == -1.0
    assert compute_mannwhitney(same, np.empty(0)) == (None, None)


@pytest.mark.parametrize("n_same, n_diff, ties", [(300, 3300, False), (40, 50, True), (9, 9, False), (5, 30, False)])
def test_mannwhitney_equals_scipy(n_same, n_diff, ties):
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(n_same)
    same, diff = rng.normal(size=n_same) + 0.1, rng.normal(size=n_diff)
    if ties:
        same, diff = np.round(same), np.round(diff)
    expected = mannwhitneyu(same, diff, alternative="two-sided")
    p, r = compute_mannwhitney(same, diff)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)
    assert r == pytest.approx(2 * expected.statistic / (n_same * n_diff) - 1, rel=1e-12)


def test_two_runs_rank_statistics_may_differ_only_by_the_flips_of_near_pairs():
    """The tests' oracle for one text run twice (tests.reference.assert_rank_statistics_close): a pair of dot
    products 1e-7 apart, flipped, moves r by 2 / (n1 n2) and passes; a pair far apart flipped, or two flips where
    one pair is near, fails; with no near pair, so does the far flip alone."""
    same, diff = np.arange(20) + 0.5, np.arange(30) - 5.0  # every pair at least 0.5 apart ...
    diff[0] = same[0] + 1e-7  # ... but one
    want = compute_mannwhitney(same, diff)
    rounded = same.copy()
    rounded[0] = diff[0] + 1e-7  # the near pair flipped, as float rounding can
    got = compute_mannwhitney(rounded, diff)
    assert got[1] - want[1] == pytest.approx(2 / 600)
    assert_rank_statistics_close(got, want, same, diff)
    moved = rounded.copy()
    moved[5] = 6.1  # and a far pair, 5.5 against 6.0
    two_flips = compute_mannwhitney(moved, diff)
    assert two_flips[1] - want[1] == pytest.approx(2 / 600 * 2)
    for wrong in (two_flips, (want[0], want[1] - 4 / 600), (got[0] * 0.98, got[1])):
        with pytest.raises(AssertionError):
            assert_rank_statistics_close(wrong, want, same, diff)
    diff[0] = -9.0  # no near pair left: the far flip alone fails, and nothing else may move
    far = same.copy()
    far[5] = 6.1
    with pytest.raises(AssertionError):
        assert_rank_statistics_close(compute_mannwhitney(far, diff), compute_mannwhitney(same, diff), same, diff)
    assert_rank_statistics_close(compute_mannwhitney(rounded, diff), compute_mannwhitney(same, diff), same, diff)


def test_centered_dot_products_ignore_a_constant_added_to_every_key():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(4, N_POS, 8)).astype(np.float32)  # [head, pos, d_head]
    k = rng.normal(size=(2, N_POS, 8)).astype(np.float32)  # [kv_head, pos, d_head]: grouped-query
    shifted = k + rng.normal(size=(2, 1, 8)).astype(np.float32) * 10  # one constant vector per key head
    assert not np.allclose(compute_dot_products(q, k)[0], compute_dot_products(q, shifted)[0])
    for a, b in zip(compute_centered_dot_products(q, k), compute_centered_dot_products(q, shifted)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    same, diff = compute_centered_dot_products(q, k)
    np.testing.assert_allclose(same.reshape(4, N_POS - 2).mean(axis=1), 0, atol=1e-5)  # each group centred
    centered = k - k[:, 1:-1].mean(axis=1, keepdims=True)  # the definition, spelled out
    for a, b in zip((same, diff), compute_dot_products(q, centered)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- on real transformers code ---------------------------------------------------------------------------------------

def eager_attentions(path, input_ids: torch.Tensor) -> list[np.ndarray]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True)
    return [a[0].numpy() for a in out.attentions]  # per layer [head, q_pos, k_pos]


@pytest.fixture(scope="module")
def bert(bert_path):
    from analysis import load_model

    return load_model(str(bert_path))


@pytest.mark.parametrize("fixture", ["gpt2", "minilm", "bert"])
@pytest.mark.parametrize("given", ["sentence", "induction probe"])
def test_scores_equal_the_definition_on_the_models_eager_attention(request, fixture, given):
    """Every score of every layer against the model's own eager attention scored loop by loop: on GPT-2
    TransformerLens's causal patterns (loop_detection_pattern equals them), on the encoders (MiniLM, a tiny BERT)
    every other copy the query sees, earlier and later (with the earlier copies alone a head on every copy of its
    token scored about half)."""
    loaded = request.getfixturevalue(fixture)
    if given == "sentence":
        captured = capture(loaded, REPEATS, pattern_layers=[0])
    else:
        captured = capture_ids(loaded, induction_probe_ids(loaded, length=20, seed=0), pattern_layers=[0])
    ids = captured.token_ids
    patterns = eager_attentions(loaded.info.path, torch.as_tensor(ids)[None])
    expected_fixed = loop_pattern_scores(patterns)
    has_bos = bool(captured.special[0])  # an encoder's [CLS], the probe's BOS; the GPT-2 sentence starts with a word
    assert has_bos == (fixture != "gpt2" or given != "sentence")
    assert loaded.info.causal is (fixture == "gpt2")
    for exclude_bos, exclude_current_token in OPTIONS:  # one capture, every option: no new forward pass
        result = summarize(captured, loaded.info.to_dict(), [0], exclude_current_token=exclude_current_token,
                           exclude_bos=exclude_bos)
        assert result.exclude_bos is exclude_bos and result.bos_excluded is (exclude_bos and has_bos)
        expected = definition_scores(patterns, ids, exclude_bos and has_bos, exclude_current_token,
                                     loaded.info.causal) | expected_fixed
        if loaded.info.causal:
            assert all(np.array_equal(expected[name], values) for name, values in tl_scores(
                patterns, ids, exclude_bos and has_bos, exclude_current_token).items())
        for name in HEAD_SCORES:
            assert result.head_scores[name].shape == (loaded.info.n_layers, loaded.info.n_heads)
            np.testing.assert_allclose(result.head_scores[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert tl_scores(patterns, ids, True, False)["duplicate_token"].max() > 0  # the text has repeats


@pytest.mark.parametrize("fixture", ["minilm", "bert"])
def test_an_encoders_corpus_pass_equals_the_definition_on_its_eager_attention(request, monkeypatch, fixture):
    """A corpus of an encoder, its texts measured at once (analysis.batched, a GPU's route) and text by text: each
    text's head scores against its own eager attention scored loop by loop (later copies too)."""
    from analysis.corpus import capture_texts, text_values

    capture_module = importlib.import_module("analysis.capture")
    loaded = request.getfixturevalue(fixture)
    texts = [REPEATS, "the cat and the dog and the cat", "a cat", "dog dog dog"]
    model = loaded.info.to_dict()
    for at_once in (False, True):
        monkeypatch.setitem(capture_module.TEXTS_AT_ONCE, "cpu", at_once)
        got = capture_texts(loaded, texts, 8, text_values(model, True, False, True), True)
        for text, (heads, _, n) in zip(texts, got):
            ids = capture(loaded, text, pattern_layers=[]).token_ids
            assert n == ids.size
            patterns = eager_attentions(loaded.info.path, torch.as_tensor(ids)[None])
            expected = definition_scores(patterns, ids, True, False, causal=False)  # [CLS] first: exclude_bos on
            for name in DETECTION:
                np.testing.assert_allclose(heads[name], expected[name], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{fixture} at once {at_once} {text!r} {name}")


# ---- TransformerLens itself: detect_head and run_with_cache on the same checkpoint ---------------------------------

TL_NAMES = {name: f"{name}_head" for name in DETECTION}  # TransformerLens's names for the three detection patterns
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: float32's unit roundoff is half of it


class GivenTokens:
    """The bridge, fed token ids instead of text. detect_head tokenizes its `seq` with model.to_tokens, and the
    induction probe is token ids (random tokens do not survive a decode and re-encode); everything else,
    the forward pass and the cache included, is the bridge's own."""

    def __init__(self, bridge, token_ids):
        self.bridge, self.cfg = bridge, bridge.cfg
        self.tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]  # [batch=1, pos]

    def to_tokens(self, seq):
        return self.tokens

    def run_with_cache(self, tokens, **kwargs):
        return self.bridge.run_with_cache(tokens, **kwargs)


@pytest.fixture(scope="module")
def bridge(gpt2_path):
    """TransformerLens 4.x's TransformerBridge around the tiny GPT-2 checkpoint, booted offline: `hf_model` and
    `tokenizer` are given, so nothing is looked up on the hub (the session's HF cache is empty and offline)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_path)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=tokenizer, device="cpu")
    bridge.cfg.default_prepend_bos = False  # tokenize the sentence exactly as headscope does (GPT-2 adds no BOS)
    return bridge


@pytest.fixture(scope="module", params=["sentence", "induction probe"])
def compared(request, gpt2, bridge):
    """(headscope's capture of every layer, what detect_head is given as model and seq, TL's cache)."""
    if request.param == "sentence":
        captured = capture(gpt2, REPEATS)
        model, seq = bridge, REPEATS
        assert bridge.to_tokens(REPEATS)[0].tolist() == captured.token_ids.tolist()  # the same tokens
    else:
        captured = capture_ids(gpt2, induction_probe_ids(gpt2, length=50, seed=0))  # 101 tokens, BOS first
        model, seq = GivenTokens(bridge, captured.token_ids), "(token ids)"
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.as_tensor(captured.token_ids)[None], remove_batch_dim=True)
    return captured, model, seq, cache


def logit_error_bound(q, k, tl_q, tl_k) -> float:
    """The largest possible difference between one headscope logit q.k/sqrt(d) and TransformerLens's, for causal
    pairs, from the q and k each side used (TransformerLens recomputes the attention in its own modules, so its
    q and k differ from the model's by float32 rounding accumulated over the earlier layers).

    Inputs: |q.k - q'.k'| <= |q - q'|.|k| + |q|.|k - k'| + |q - q'|.|k - k'| elementwise in absolute values.
    Rounding: a float32 dot product of d terms is off by at most d * u * sum_i |q_i k_i| (u = eps / 2, the unit
    roundoff; Higham, Accuracy and Stability of Numerical Algorithms, 3.1), once on each side."""
    q, k, tl_q, tl_k = (np.asarray(x, dtype=np.float64) for x in (q, k, tl_q, tl_k))  # [head, pos, d_head]
    d, n = q.shape[-1], q.shape[1]
    dq, dk = np.abs(q - tl_q), np.abs(k - tl_k)  # [head, pos, d_head]
    kt, dkt = np.abs(k).transpose(0, 2, 1), dk.transpose(0, 2, 1)  # [head, d_head, k_pos]
    inputs = dq @ kt + np.abs(q) @ dkt + dq @ dkt  # [h, q, d] @ [h, d, k] -> [h, q, k]
    rounding = 2 * d * (EPS32 / 2) * (np.abs(q) @ kt)  # [h, q, d] @ [h, d, k] -> [h, q, k]
    causal = np.tril(np.ones((n, n), dtype=bool))  # [q_pos, k_pos]
    return float((inputs + rounding)[:, causal].max() / np.sqrt(d))


def test_q_k_and_patterns_equal_transformer_lens_run_with_cache(compared):
    """q and k against TransformerLens's hook_q/hook_k, and the patterns against cache["pattern", layer].

    q and k: each layer's matmuls round at most d_model * u relative (u = eps / 2), and the two forward passes
    round differently, so by layer L the drift is at most about (L + 1) * d_model * u of the largest value
    (first order: the differences add up along the residual stream).
    Patterns: a logit error of at most delta (logit_error_bound) moves a softmax weight p by at most
    p * (exp(2 delta) - 1) <= 2 delta * exp(2 delta), plus a few units of roundoff for exp and the
    normalisation (8 u)."""
    captured, _, _, cache = compared
    n_layers, d_model = len(captured.q), captured.q[0].shape[0] * captured.q[0].shape[2]
    assert sorted(captured.patterns) == list(range(n_layers))
    for layer in range(n_layers):
        tl_q = cache["q", layer].numpy().transpose(1, 0, 2)  # [pos, head, d_head] -> [head, pos, d_head]
        tl_k = cache["k", layer].numpy().transpose(1, 0, 2)  # [pos, head, d_head] -> [head, pos, d_head]
        for ours, theirs in ((captured.q[layer], tl_q), (captured.k[layer], tl_k)):
            drift = (layer + 1) * d_model * (EPS32 / 2) * np.abs(theirs).max()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=drift, err_msg=f"q/k, layer {layer}")
        delta = logit_error_bound(captured.q[layer], captured.k[layer], tl_q, tl_k)
        tolerance = 2 * delta * np.exp(2 * delta) + 8 * (EPS32 / 2)
        expected = cache["pattern", layer].numpy()  # [head, q_pos, k_pos]
        assert expected.shape == captured.patterns[layer].shape
        np.testing.assert_allclose(captured.patterns[layer], expected, rtol=0, atol=tolerance, err_msg=f"layer {layer}")


def score_error_bound(captured, cache, name, exclude_bos, exclude_current_token) -> np.ndarray:
    """[layer, head]: how far a detection score may move between headscope and TransformerLens, from the patterns.

    headscope scores the model's own eager weights W (in float64); TransformerLens scores its pattern A (in
    float32). Per entry |W - A| <= e = |pattern - A| + parity (the capture's pattern is within `parity` of W).
    Over the kept entries (keep) with detection pattern P, the numerator N = sum(A P) moves by at most
    dN = sum(e P), the denominator D = sum(A) by at most dD = sum(e), so the score s = N / D moves by at most
    (dN + s dD) / (D - dD). TransformerLens's own float32 sums of n = T^2 terms add at most n * u relative to
    each of N and D (any summation order), 2 n u s on the score."""
    ids = captured.token_ids
    n = len(ids)
    keep = np.ones((n, n))  # [q_pos, k_pos]
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(keep, 0)
    detection = {"previous_token": np.eye(n, k=-1), "duplicate_token": compute_duplicate_token_pattern(ids),
                 "induction": compute_induction_pattern(ids)}[name] * keep  # [q_pos, k_pos]
    bounds = []
    for layer in range(len(captured.q)):
        tl = cache["pattern", layer].numpy().astype(np.float64)  # [head, q_pos, k_pos]
        error = np.abs(captured.patterns[layer] - tl) + captured.parity[layer]  # [head, q_pos, k_pos]
        numerator, denominator = (tl * detection).sum(axis=(1, 2)), (tl * keep).sum(axis=(1, 2))  # [head]
        d_num, d_den = (error * detection).sum(axis=(1, 2)), (error * keep).sum(axis=(1, 2))  # [head]
        score = numerator / denominator
        bounds.append((d_num + score * d_den) / (denominator - d_den) + 2 * n * n * (EPS32 / 2) * score)
    return np.array(bounds)  # [layer, head]


@pytest.mark.parametrize("exclude_bos, exclude_current_token", OPTIONS)
def test_detection_scores_equal_transformer_lens_detect_head(gpt2, compared, exclude_bos, exclude_current_token):
    """TransformerLens's own detect_head (its tokenizer, detection patterns, forward pass and "mul" score) against
    headscope's scores from one capture, every option, within score_error_bound."""
    captured, model, seq, cache = compared
    result = summarize(captured, gpt2.info.to_dict(), [], exclude_current_token=exclude_current_token,
                       exclude_bos=exclude_bos)
    # TransformerLens drops column 0 whatever it holds (it prepends BOS itself); headscope only when it is a
    # special token: the probe's BOS, not the sentence's first word
    applied = exclude_bos and bool(captured.special[0])
    assert applied == (exclude_bos and seq == "(token ids)") == result.bos_excluded
    for name in DETECTION:
        with torch.no_grad():
            expected = detect_head(model, seq, TL_NAMES[name], exclude_bos=applied,
                                   exclude_current_token=exclude_current_token).numpy()  # [layer, head]
        bound = score_error_bound(captured, cache, name, applied, exclude_current_token)
        ours = result.head_scores[name]
        assert ours.shape == expected.shape == (8, 12)
        assert np.all(np.abs(ours - expected) <= bound), (name, np.abs(ours - expected).max(), bound.max())
        # the heads differ: the spread of the scores is far beyond the tolerance, so a score that ignored its
        # head, its layer or its detection pattern could not pass
        assert np.ptp(expected) > 100 * bound.max(), (name, np.ptp(expected), bound.max())


def test_the_sentence_and_the_probe_have_what_the_detectors_look_for(compared):
    captured, _, _, _ = compared
    ids = captured.token_ids
    assert compute_duplicate_token_pattern(ids).sum() > 0 and compute_induction_pattern(ids).sum() > 0


def test_scores_cover_every_layer_while_one_layers_patterns_are_kept(gpt2):
    captured = capture(gpt2, REPEATS, pattern_layers=[6])
    assert set(captured.patterns) == {6}
    assert captured.score_parts.shape[:2] == captured.score_fixed.shape[:2] == (8, 12)
    one = summarize(captured, gpt2.info.to_dict(), [6])
    every = analyze(gpt2, REPEATS)
    assert set(one.layers) == {6} and one.layers[6].patterns.shape == (12, len(captured.tokens), len(captured.tokens))
    for name in HEAD_SCORES:
        assert one.head_scores[name].shape == (8, 12) and np.isfinite(one.head_scores[name]).all()
        np.testing.assert_array_equal(one.head_scores[name], every.head_scores[name])


def test_json_round_trip_with_head_scores_and_dp_stats(gpt2):
    result = analyze(gpt2, FIJI, layers=[6])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert sorted(data["head_scores"]) == sorted(HEAD_SCORES)
    assert all(len(rows) == 8 and all(len(row) == 12 for row in rows) for rows in data["head_scores"].values())
    stats = data["layers"]["6"]["dp_stats"]
    assert 0 <= stats["mannwhitney_p"] <= 1 and -1 <= stats["rank_biserial"] <= 1
    assert len(stats["same_head_dp_centered"]) == len(data["layers"]["6"]["same_head_dp"])
    again = AnalysisResult.from_dict(data)
    for name in HEAD_SCORES:
        np.testing.assert_array_equal(again.head_scores[name], result.head_scores[name])
    assert again.layers[6].dp_stats.rank_biserial == result.layers[6].dp_stats.rank_biserial
    assert again.to_dict() == data


@pytest.mark.parametrize("fixture", ["gpt2", "minilm"])
def test_a_document_names_its_scores_definition_and_an_old_encoders_is_marked(request, fixture, tmp_path):
    """Every document says which copies its duplicate-token and induction scores count (settings.score_definition).
    One written before it: on a causal model the same numbers (today's definition); on an encoder the earlier copies
    alone, marked so when it is read back (AnalysisResult.from_dict, a report's JSON through --from-report) and said
    on the page, never presented as today's."""
    from reports.html import read_report_document, render_report

    loaded = request.getfixturevalue(fixture)
    result = analyze(loaded, REPEATS, layers=[0])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["settings"]["score_definition"] == "seen_copies"
    assert AnalysisResult.from_dict(data).score_definition == "seen_copies"
    assert "written before 2026-12-07" not in render_report(result)
    del data["settings"]["score_definition"]  # as a document of before it
    want = "seen_copies" if loaded.info.causal else "earlier_copies"
    old = AnalysisResult.from_dict(data)
    assert old.score_definition == want and old.to_dict()["settings"]["score_definition"] == want
    page = render_report(old)
    assert ("written before 2026-12-07 by an encoder" in page) is (want == "earlier_copies")
    report = tmp_path / "old.html"  # a report of before it: its embedded JSON has no score_definition
    report.write_text(re.sub(r', "score_definition": "[a-z_]+"', "", page), encoding="utf-8")
    assert '"score_definition"' not in report.read_text(encoding="utf-8")
    assert read_report_document(report)["settings"]["score_definition"] == want


def test_undefined_values_are_json_null(gpt2):
    # one token, its own attention excluded: nothing left to score (exclude_bos keeps a first word)
    result = analyze(gpt2, "cat", layers=[0], exclude_current_token=True)
    assert result.n_tokens == 1
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["head_scores"]["previous_token"][0][0] is None and data["head_scores"]["sink"][0][0] is None
    assert data["layers"]["0"]["dp_stats"]["mannwhitney_p"] is None
    assert np.isnan(AnalysisResult.from_dict(data).head_scores["induction"]).all()


# ---- the induction probe -------------------------------------------------------------------------------------------

def test_induction_probe_is_a_seeded_repeat_with_bos_first(gpt2, minilm):
    ids = induction_probe_ids(gpt2, length=20, seed=0)
    bos = gpt2.tokenizer.bos_token_id
    assert ids[0] == bos and len(ids) == 41
    np.testing.assert_array_equal(ids[1:21], ids[21:])
    assert len(set(ids[1:21].tolist())) == 20 and bos not in ids[1:]
    np.testing.assert_array_equal(ids, induction_probe_ids(gpt2, length=20, seed=0))
    assert not np.array_equal(ids, induction_probe_ids(gpt2, length=20, seed=1))
    bert = induction_probe_ids(minilm, length=10)
    assert [bert[0], bert[-1]] == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]
    np.testing.assert_array_equal(bert[1:11], bert[11:21])


def test_induction_probe_analysis(gpt2):
    result = analyze_induction_probe(gpt2, length=30, seed=3, layers=[6])
    ids = induction_probe_ids(gpt2, length=30, seed=3)
    np.testing.assert_array_equal(result.token_ids, ids)
    assert result.to_dict()["settings"]["induction_probe"] == {"length": 30, "seed": 3}
    assert result.special_positions == (0,)
    plain = analyze_ids(gpt2, ids, layers=[6])
    np.testing.assert_array_equal(plain.head_scores["induction"], result.head_scores["induction"])
    assert plain.induction_probe is None
    # one induction target for every query of the second copy, none before
    assert compute_induction_pattern(ids).sum(axis=1).tolist() == [0] * 31 + [1] * 30


def test_induction_probe_too_long_is_refused(gpt2):
    with pytest.raises(HeadscopeError, match="at most 63"):
        induction_probe_ids(gpt2, length=64)
