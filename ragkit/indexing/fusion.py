"""Hybrid retrieval as pure functions on runs: linear score fusion and reciprocal rank fusion.

**Linear fusion** is DPR's and pyserini's ``HybridSearcher``: for one question take the union of the two
top-``depth`` lists; a passage one list did not retrieve gets that list's *minimum* score (the lowest
score it did retrieve, 0 when it retrieved nothing); the fused score is ``dense + alpha * sparse``; keep
the top ``depth``. With ``normalize`` each list's scores (fill included) are first mapped by pyserini's
``(s - (min + max) / 2) / (max - min)``, so both lie in [-0.5, 0.5] and alpha weighs comparable ranges.

**Reciprocal rank fusion** (Cormack et al., SIGIR 2009) scores a passage ``sum 1 / (k + rank)`` over the
lists that retrieved it, ranks counted from 1, ``k = 60``; a list that missed it adds nothing.

Ties are broken the same way in both: by the passage's rank in the dense list, then in the sparse list
(a missing rank counts as worse than any), then by passage id, so the output never depends on set order.

:func:`candidates` gathers one question's union once, so a grid of alphas can be ranked without
re-reading the runs (:func:`linear_order`), which is how the hybrid stage tunes alpha.
"""

from __future__ import annotations

import dataclasses
from itertools import zip_longest
from typing import Iterable, Iterator, Literal

import numpy as np

from ..runs import Ranking, Run

RRF_K = 60
FusionMethod = Literal["linear", "rrf"]


@dataclasses.dataclass
class Candidates:
    """One question's union of two top-``depth`` lists, in tie-break order (dense rank, sparse rank, id)."""

    question_id: str
    passage_ids: list[str]
    dense: np.ndarray
    """(N,) dense score of each passage, the list's minimum where it was not retrieved."""
    sparse: np.ndarray
    """(N,) sparse score, filled the same way."""
    dense_rank: np.ndarray
    """(N,) 1-based rank in the dense list, 0 where it was not retrieved."""
    sparse_rank: np.ndarray
    """(N,) 1-based rank in the sparse list, 0 where it was not retrieved."""

    def __len__(self) -> int:
        return len(self.passage_ids)


def _normalized(scores: np.ndarray) -> np.ndarray:
    """pyserini's min-max centring: ``(s - (min + max) / 2) / (max - min)``; a constant list maps to 0."""
    if len(scores) == 0:
        return scores
    low, high = float(scores.min()), float(scores.max())
    if high == low:
        return np.zeros_like(scores)
    return (scores - (low + high) / 2) / (high - low)


def candidates(dense: Ranking | None, sparse: Ranking | None, depth: int, normalize: bool = False) -> Candidates:
    """The union of the top ``depth`` of each ranking (either may be None: nothing retrieved)."""
    lists = []
    for ranking in (dense, sparse):
        ids = list(ranking.passage_ids[:depth]) if ranking is not None else []
        scores = np.asarray(ranking.scores[:depth] if ranking is not None else [], dtype=np.float64)
        lists.append((dict(zip(ids, range(1, len(ids) + 1))), scores))
    (dense_ranks, dense_scores), (sparse_ranks, sparse_scores) = lists
    question_id = (dense or sparse).question_id if (dense or sparse) is not None else ""
    missing = len(dense_scores) + len(sparse_scores) + 1  # sorts after every real rank
    union = sorted(
        set(dense_ranks) | set(sparse_ranks),
        key=lambda p: (dense_ranks.get(p, missing), sparse_ranks.get(p, missing), p),
    )
    d_rank = np.array([dense_ranks.get(p, 0) for p in union], dtype=np.int64)  # (N,)
    s_rank = np.array([sparse_ranks.get(p, 0) for p in union], dtype=np.int64)  # (N,)
    filled = []
    for scores, ranks in ((dense_scores, d_rank), (sparse_scores, s_rank)):
        fill = float(scores.min()) if len(scores) else 0.0
        values = np.where(ranks > 0, scores[np.maximum(ranks - 1, 0)] if len(scores) else fill, fill)  # (N,)
        filled.append(_normalized(values.astype(np.float64)) if normalize else values.astype(np.float64))
    return Candidates(question_id, union, filled[0], filled[1], d_rank, s_rank)


def linear_scores(c: Candidates, alphas: np.ndarray) -> np.ndarray:
    """(A, N) fused scores ``dense + alpha * sparse`` for each alpha."""
    return c.dense[None, :] + np.asarray(alphas, dtype=np.float64)[:, None] * c.sparse[None, :]


def rrf_scores(c: Candidates, k: float = RRF_K) -> np.ndarray:
    """(N,) ``sum 1 / (k + rank)`` over the lists that retrieved each passage."""
    out = np.zeros(len(c), dtype=np.float64)
    for ranks in (c.dense_rank, c.sparse_rank):
        found = ranks > 0
        out[found] += 1.0 / (k + ranks[found])
    return out


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; the stable sort keeps the candidates' tie-break order among equals."""
    return np.argsort(-scores, axis=-1, kind="stable")


def linear_order(c: Candidates, alphas: np.ndarray, depth: int) -> np.ndarray:
    """(A, min(N, depth)) candidate indices of the fused ranking for each alpha, best first."""
    return _order(linear_scores(c, alphas))[:, :depth]


def _ranking(c: Candidates, scores: np.ndarray, depth: int) -> Ranking:
    order = _order(scores)[:depth]
    return Ranking(c.question_id, [c.passage_ids[i] for i in order], [float(scores[i]) for i in order])


def fuse_linear(dense: Ranking | None, sparse: Ranking | None, alpha: float, depth: int = 100,
                normalize: bool = False) -> Ranking:
    """One question's linear fusion: top ``depth`` of ``dense + alpha * sparse`` over the union."""
    c = candidates(dense, sparse, depth, normalize)
    return _ranking(c, linear_scores(c, np.array([alpha]))[0], depth)


def fuse_rrf(dense: Ranking | None, sparse: Ranking | None, k: float = RRF_K, depth: int = 100) -> Ranking:
    """One question's reciprocal rank fusion over the two top-``depth`` lists."""
    c = candidates(dense, sparse, depth)
    return _ranking(c, rrf_scores(c, k), depth)


def paired(dense: Iterable[Ranking], sparse: Iterable[Ranking]) -> Iterator[tuple[Ranking | None, Ranking | None]]:
    """Each question's (dense, sparse) rankings, None where a run lacks it; streams runs in the same order.

    Rankings wait in a buffer until their partner arrives, so two runs listing questions in the same
    order hold one question each in memory, and runs in different orders still pair correctly.
    """
    waiting: tuple[dict[str, Ranking], dict[str, Ranking]] = ({}, {})
    for pair in zip_longest(dense, sparse):
        for side, ranking in enumerate(pair):
            if ranking is None:
                continue
            other = waiting[1 - side].pop(ranking.question_id, None)
            if other is None:
                waiting[side][ranking.question_id] = ranking
            else:
                yield (ranking, other) if side == 0 else (other, ranking)
    yield from ((ranking, None) for ranking in waiting[0].values())
    yield from ((None, ranking) for ranking in waiting[1].values())


def fuse_rankings(dense: Iterable[Ranking], sparse: Iterable[Ranking], method: FusionMethod = "linear",
                  alpha: float = 1.0, depth: int = 100, normalize: bool = False, rrf_k: float = RRF_K) -> Iterator[Ranking]:
    """Fuse two runs question by question (a question in either run is in the output)."""
    for d, s in paired(dense, sparse):
        if method == "linear":
            yield fuse_linear(d, s, alpha, depth, normalize)
        elif method == "rrf":
            yield fuse_rrf(d, s, rrf_k, depth)
        else:
            raise ValueError(f"unknown fusion method {method!r}")


def linear_fusion(dense: Run, sparse: Run, alpha: float, depth: int = 100, normalize: bool = False,
                  tag: str = "ragkit-hybrid") -> Run:
    """Linear fusion of two whole runs: ``dense + alpha * sparse`` (see the module docstring)."""
    out = Run(tag=tag)
    for ranking in fuse_rankings(dense, sparse, "linear", alpha, depth, normalize):
        out.rankings[ranking.question_id] = ranking
    return out


def reciprocal_rank_fusion(dense: Run, sparse: Run, k: float = RRF_K, depth: int = 100, tag: str = "ragkit-hybrid") -> Run:
    """Reciprocal rank fusion of two whole runs: ``sum 1 / (k + rank)``."""
    out = Run(tag=tag)
    for ranking in fuse_rankings(dense, sparse, "rrf", depth=depth, rrf_k=k):
        out.rankings[ranking.question_id] = ranking
    return out
