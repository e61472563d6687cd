"""Fusion of two runs: linear (DPR / pyserini hybrid) and reciprocal rank fusion, checked by hand and
against a naive dictionary loop written the way pyserini's ``HybridSearcher._hybrid_results`` reads."""

import random

import numpy as np
import pytest

from ragkit.indexing.fusion import (
    candidates,
    fuse_linear,
    fuse_rankings,
    fuse_rrf,
    linear_fusion,
    linear_order,
    paired,
    reciprocal_rank_fusion,
)
from ragkit.runs import Ranking, Run

DENSE = Ranking("q", ["a", "b", "c"], [0.9, 0.8, 0.5])
SPARSE = Ranking("q", ["b", "d", "a"], [12.0, 10.0, 7.0])


def as_dict(ranking):
    return dict(zip(ranking.passage_ids, ranking.scores))


def test_linear_union_fill_and_alpha_by_hand():
    # c is missing from BM25: it gets BM25's minimum 7; d is missing from dense: it gets dense's minimum 0.5.
    fused = fuse_linear(DENSE, SPARSE, alpha=0.1)
    assert fused.passage_ids == ["b", "a", "d", "c"]
    assert as_dict(fused) == pytest.approx({"a": 0.9 + 0.7, "b": 0.8 + 1.2, "c": 0.5 + 0.7, "d": 0.5 + 1.0})
    # alpha 2: BM25 dominates.
    assert fuse_linear(DENSE, SPARSE, alpha=2.0).passage_ids == ["b", "d", "a", "c"]
    # alpha 0 keeps the dense order; c (dense rank 3) and d (filled 0.5) tie, the dense rank breaks it.
    fused = fuse_linear(DENSE, SPARSE, alpha=0.0)
    assert fused.passage_ids == ["a", "b", "c", "d"] and fused.scores == [0.9, 0.8, 0.5, 0.5]


def test_depth_cuts_both_lists_before_the_union():
    # Top 2 of each: dense a, b (min 0.8); BM25 b, d (min 10). a = 0.9 + 1.0, b = 0.8 + 1.2, d = 0.8 + 1.0.
    fused = fuse_linear(DENSE, SPARSE, alpha=0.1, depth=2)
    assert fused.passage_ids == ["b", "a"] and fused.scores == pytest.approx([2.0, 1.9])
    assert "c" not in candidates(DENSE, SPARSE, depth=2).passage_ids


def test_ties_are_broken_by_dense_rank_then_sparse_rank_then_id():
    dense = Ranking("q", ["x", "y"], [1.0, 0.5])
    sparse = Ranking("q", ["y", "x"], [1.0, 0.5])
    assert fuse_linear(dense, sparse, alpha=1.0).passage_ids == ["x", "y"]  # 1.5 each; x is first in dense
    assert fuse_linear(sparse, dense, alpha=1.0).passage_ids == ["y", "x"]
    # Missing from dense: both filled with dense's minimum, so at alpha 0 they tie; BM25's order decides.
    only_sparse = Ranking("q", ["n", "m"], [3.0, 2.0])
    fused = fuse_linear(Ranking("q", ["k"], [1.0]), only_sparse, alpha=0.0)
    assert fused.passage_ids == ["k", "n", "m"]
    # Missing from both orders (same ranks): the passage id.
    assert fuse_rrf(Ranking("q", ["z"], [1.0]), Ranking("q", ["w"], [1.0])).passage_ids == ["z", "w"]
    assert fuse_rrf(Ranking("q", ["w"], [1.0]), Ranking("q", ["z"], [1.0])).passage_ids == ["w", "z"]


def test_normalisation_is_pyserinis_min_max_centring():
    # dense (s - 0.7) / 0.4: a .5, b .25, c -.5, d (fill .5) -.5; BM25 (s - 9.5) / 5: b .5, d .1, a -.5, c -.5.
    fused = fuse_linear(DENSE, SPARSE, alpha=1.0, normalize=True)
    assert as_dict(fused) == pytest.approx({"a": 0.0, "b": 0.75, "c": -1.0, "d": -0.4})
    assert fused.passage_ids == ["b", "a", "d", "c"]
    # A list of equal scores normalises to zeros instead of dividing by zero.
    flat = fuse_linear(Ranking("q", ["a", "b"], [2.0, 2.0]), Ranking("q", ["b"], [5.0]), alpha=1.0, normalize=True)
    assert flat.scores == [0.0, 0.0]


def test_reciprocal_rank_fusion_by_hand():
    fused = fuse_rrf(DENSE, SPARSE, k=60)
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62}
    assert as_dict(fused) == pytest.approx(expected, abs=1e-15)
    assert fused.passage_ids == ["b", "a", "d", "c"]
    assert as_dict(fuse_rrf(DENSE, SPARSE, k=1)) == pytest.approx({"a": 1 / 2 + 1 / 4, "b": 1 / 3 + 1 / 2, "c": 1 / 4, "d": 1 / 3})
    # Symmetric ranks tie; the dense rank breaks it.
    assert fuse_rrf(Ranking("q", ["x", "y"], [2, 1]), Ranking("q", ["y", "x"], [2, 1])).passage_ids == ["x", "y"]


def test_a_question_missing_from_one_run():
    fused = fuse_linear(None, SPARSE, alpha=0.5)
    assert fused.passage_ids == ["b", "d", "a"] and fused.scores == pytest.approx([6.0, 5.0, 3.5])  # dense fill 0
    assert fuse_linear(DENSE, None, alpha=0.5).passage_ids == ["a", "b", "c"]
    assert fuse_rrf(None, SPARSE).passage_ids == ["b", "d", "a"]


def naive_linear(dense, sparse, alpha, depth, normalize):
    """pyserini's HybridSearcher._hybrid_results as a dictionary loop, with our deterministic tie order."""
    d = dict(zip(dense.passage_ids[:depth], dense.scores[:depth]))
    s = dict(zip(sparse.passage_ids[:depth], sparse.scores[:depth]))
    d_rank = {p: i for i, p in enumerate(dense.passage_ids[:depth])}
    s_rank = {p: i for i, p in enumerate(sparse.passage_ids[:depth])}
    min_d, max_d = min(d.values()), max(d.values())
    min_s, max_s = min(s.values()), max(s.values())
    out = []
    for pid in set(d) | set(s):
        ds, ss = d.get(pid, min_d), s.get(pid, min_s)
        if normalize:
            ss = (ss - (min_s + max_s) / 2) / (max_s - min_s)
            ds = (ds - (min_d + max_d) / 2) / (max_d - min_d)
        out.append((ds + alpha * ss, pid))
    out.sort(key=lambda t: (-t[0], d_rank.get(t[1], 10**9), s_rank.get(t[1], 10**9), t[1]))
    return [pid for _, pid in out[:depth]], [score for score, _ in out[:depth]]


def random_ranking(rng, qid, pool, n, scale):
    pids = rng.sample(pool, n)
    scores = sorted((round(rng.uniform(0, scale), 2) for _ in pids), reverse=True)  # rounding makes ties
    return Ranking(qid, pids, scores)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_fusion_matches_naive_loop_on_random_runs(normalize):
    rng = random.Random(7)
    pool = [f"p{i}" for i in range(40)]
    for trial in range(200):
        dense = random_ranking(rng, "q", pool, rng.randint(2, 15), 1.0)
        sparse = random_ranking(rng, "q", pool, rng.randint(2, 15), 30.0)
        alpha, depth = rng.choice([0.0, 0.03, 0.5, 1.1, 4.0]), rng.choice([3, 8, 100])
        fused = fuse_linear(dense, sparse, alpha, depth, normalize)
        ids, scores = naive_linear(dense, sparse, alpha, depth, normalize)
        assert fused.passage_ids == ids and fused.scores == scores, trial


def test_linear_order_over_a_grid_equals_one_fusion_per_alpha():
    rng = random.Random(3)
    pool = [f"p{i}" for i in range(30)]
    dense = random_ranking(rng, "q", pool, 12, 1.0)
    sparse = random_ranking(rng, "q", pool, 12, 20.0)
    grid = np.array([0.0, 0.01, 0.1, 1.0, 10.0])
    c = candidates(dense, sparse, depth=10)
    orders = linear_order(c, grid, depth=10)  # (A, n)
    for alpha, order in zip(grid, orders):
        assert [c.passage_ids[i] for i in order] == fuse_linear(dense, sparse, alpha, depth=10).passage_ids


def test_runs_pair_by_question_whatever_their_order():
    dense = [Ranking("q1", ["a"], [1.0]), Ranking("q2", ["b"], [1.0]), Ranking("q3", ["c"], [1.0])]
    sparse = [Ranking("q3", ["c"], [2.0]), Ranking("q1", ["x"], [2.0]), Ranking("q4", ["y"], [2.0])]
    pairs = {(d or s).question_id: (d, s) for d, s in paired(dense, sparse)}
    assert set(pairs) == {"q1", "q2", "q3", "q4"}
    assert pairs["q1"] == (dense[0], sparse[1]) and pairs["q3"] == (dense[2], sparse[0])
    assert pairs["q2"] == (dense[1], None) and pairs["q4"] == (None, sparse[2])
    # A question is written when its partner arrives; the unpaired ones follow.
    assert [r.question_id for r in fuse_rankings(dense, sparse, "rrf")] == ["q1", "q3", "q2", "q4"]


def test_whole_run_functions():
    dense, sparse = Run(tag="dense"), Run(tag="bm25")
    dense.add("q", DENSE.passage_ids, DENSE.scores)
    sparse.add("q", SPARSE.passage_ids, SPARSE.scores)
    fused = linear_fusion(dense, sparse, alpha=0.1, depth=3)
    assert fused.tag == "ragkit-hybrid" and fused["q"].passage_ids == ["b", "a", "d"]
    assert reciprocal_rank_fusion(dense, sparse, depth=2)["q"].passage_ids == ["b", "a"]
