"""Contrastive losses for the dual encoder: one family, the options compose.

Every variant is a cross-entropy over one partition per query ``i``: the numerator is the score of the
pair (query ``i``, its positive passage), the denominator sums the exponentiated scores of every candidate
the chosen *directions* put in that query's pool. Which entries may enter a pool is decided by boolean
masks built explicitly (:func:`candidate_masks`, :func:`positive_mask`, :func:`guided_false_negatives`), so
the math can be read off the masks and checked against a naive loop.

Batch layout (the loss always sees the *global* batch; under ``torch.distributed`` the caller all-gathers
the representations with gradient first)::

    query    (B, D)       query i
    passage  (B * G, D)   row i * G: query i's positive; rows i * G + 1 .. i * G + G - 1: its hard negatives
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RagkitError

DIRECTIONS: tuple[str, ...] = ("query_to_passage", "query_to_query", "passage_to_query", "passage_to_passage")
SIMILARITIES: tuple[str, ...] = ("dot", "cos")
GUIDE_MARGIN_STRATEGIES: tuple[str, ...] = ("none", "absolute", "relative")


def direction_scores(
    query: Tensor, passage: Tensor, group_size: int, directions: tuple[str, ...], similarity: str
) -> dict[str, Tensor]:
    """One score block per direction; row ``i`` of every block belongs to the pair (query i, positive i).

    ``query_to_passage`` ``(B, B*G)``: s(q_i, p_k) over every passage in the batch.
    ``query_to_query`` ``(B, B)``: s(q_i, q_j).
    ``passage_to_query`` ``(B, B)``: s(d_i, q_j), with d_i query i's positive.
    ``passage_to_passage`` ``(B, B*G)``: s(d_i, p_k).
    """
    if similarity == "cos":
        # Normalise once instead of once per block.
        query = F.normalize(query, dim=-1)
        passage = F.normalize(passage, dim=-1)
    positive = passage[::group_size]  # (B, D)
    pairs = {
        "query_to_passage": (query, passage),
        "query_to_query": (query, query),
        "passage_to_query": (positive, query),
        "passage_to_passage": (positive, passage),
    }
    return {name: pairs[name][0] @ pairs[name][1].T for name in directions}


def candidate_masks(
    batch_size: int, group_size: int, directions: tuple[str, ...], device: torch.device | None = None
) -> dict[str, Tensor]:
    """Which entries of each score block belong to query ``i``'s partition (True = candidate).

    q->p keeps every passage (its own positive and hard negatives, everyone else's too). q->q and d->q drop
    ``j == i``: the query itself, and the positive pair that q->p already counts once. d->d drops every
    passage of query ``i`` (its positive and its own hard negatives), as the GTE loss defines it.
    """
    anchors = torch.arange(batch_size, device=device)  # (B,)
    owner = torch.arange(batch_size * group_size, device=device) // group_size  # (B*G,) query each passage belongs to
    other_query = anchors[:, None] != anchors[None, :]  # (B, B)
    masks = {
        "query_to_passage": torch.ones(batch_size, batch_size * group_size, dtype=torch.bool, device=device),
        "query_to_query": other_query,
        "passage_to_query": other_query,
        "passage_to_passage": anchors[:, None] != owner[None, :],  # (B, B*G)
    }
    return {name: masks[name] for name in directions}


def positive_mask(batch_size: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """``(B, B*G)`` True exactly at (i, i*G): each query's positive in the q->p block."""
    anchors = torch.arange(batch_size, device=device)
    columns = torch.arange(batch_size * group_size, device=device)
    return columns[None, :] == anchors[:, None] * group_size


def labelled_false_negatives(
    passage_rows: Tensor, known_rows: Tensor, group_size: int, directions: tuple[str, ...]
) -> dict[str, Tensor]:
    """True where a candidate is a passage *labelled* relevant to the anchor's query (never its own positive).

    ``passage_rows`` ``(B*G,)`` identifies each passage of the batch (its row in the corpus);
    ``known_rows`` ``(B, K)`` lists, per query, the rows known to be relevant to it (its positives and the
    passages mining found to contain its answer), padded with -1. In a batch of questions that share
    passages (SQuAD-style data has several questions per paragraph) another query's positive, or a copy of
    it, can be a positive of query ``i``: pushing it away teaches the model the opposite of the labels.

    q->p drops passage ``k`` when ``rows[k]`` is known for query ``i``; d->q drops query ``j`` when ``d_i``
    is known for ``j``; d->d drops passage ``k`` when it is known for query ``i`` (both it and ``d_i`` answer
    ``q_i``); q->q is unchanged (two questions about one passage are still different questions).
    """
    batch_size = known_rows.size(0)
    known = (known_rows[:, :, None] == passage_rows[None, None, :]) & (known_rows[:, :, None] >= 0)
    known = known.any(dim=1)  # (B, B*G): passage k is labelled relevant to query i
    own = positive_mask(batch_size, group_size, passage_rows.device)  # (B, B*G)
    known_positive = known[:, ::group_size]  # (B, B): positive of query j is known for query i
    masks = {
        "query_to_passage": known & ~own,
        "query_to_query": torch.zeros(batch_size, batch_size, dtype=torch.bool, device=passage_rows.device),
        "passage_to_query": known_positive.T & ~torch.eye(batch_size, dtype=torch.bool, device=passage_rows.device),
        "passage_to_passage": known,
    }
    return {name: masks[name] for name in directions}


def guide_threshold(guide_positive: Tensor, strategy: str, margin: float) -> Tensor:
    """Per-query threshold ``(B, 1)`` above which the guide calls a candidate a false negative.

    ``guide_positive`` ``(B,)`` is the guide's similarity of each query to its own positive. The relative
    margin scales by ``|g_pos|`` so a negative similarity moves the threshold down, not up.
    """
    g_pos = guide_positive[:, None]  # (B, 1)
    if strategy == "none":
        return g_pos
    if strategy == "absolute":
        return g_pos - margin
    return g_pos - g_pos.abs() * margin


def guided_false_negatives(guide_scores: dict[str, Tensor], threshold: Tensor) -> dict[str, Tensor]:
    """True where the guide rates a candidate strictly above query ``i``'s threshold (a tie is kept)."""
    return {name: scores > threshold for name, scores in guide_scores.items()}


class ContrastiveLoss(nn.Module):
    """Softmax cross-entropy of each query's positive against a pool of in-batch candidates.

    For query ``i`` with positive ``d_i``, ``loss_i = -log(e^{s(q_i, d_i)/t} / Z_i)``, and the loss is the mean
    over queries. The directions choose the pool, one *joint* partition per query:

    - ``query_to_passage`` (DPR, always on): ``Z_i = sum_k e^{s(q_i, p_k)/t}`` over all ``B*G`` passages of
      the batch, i.e. every query's positive and hard negatives. Alone this is DPR's negative log-likelihood.
    - ``query_to_query`` adds ``sum_{j != i} e^{s(q_i, q_j)/t}``.
    - ``passage_to_query`` adds ``sum_{j != i} e^{s(d_i, q_j)/t}``.
    - ``passage_to_passage`` adds ``sum_k e^{s(d_i, p_k)/t}`` over the passages that do not belong to query
      ``i`` (other queries' positives and hard negatives).

    All four together are GTE's improved contrastive loss. The q->q and d->d pools never contain the
    positive, so they only make sense inside the joint partition with q->p; a direction set without
    ``query_to_passage`` is refused.

    With a guide (GISTEmbed), the caller passes embeddings of the same queries and passages from a frozen
    guide model. Guide similarity is cosine. Per query, ``g_pos = cos_guide(q_i, d_i)`` sets a threshold:
    ``none``: ``g_pos``; ``absolute``: ``g_pos - margin``; ``relative``: ``g_pos - |g_pos| * margin``. Every
    candidate, in every direction in use, whose guide similarity to the anchor of its block (``q_i`` for
    q->p / q->q, ``d_i`` for d->q / d->d) is strictly greater than the threshold is dropped from ``Z_i``
    as a likely false negative. A candidate exactly at the threshold stays. The positive is never dropped,
    even when the margin puts the threshold below ``g_pos``.

    References:
        - Karpukhin et al. 2020, Dense Passage Retrieval for Open-Domain Question Answering, arXiv:2004.04906
        - Li et al. 2023, Towards General Text Embeddings with Multi-stage Contrastive Learning,
          arXiv:2308.03281 (the improved contrastive loss)
        - Solatorio 2024, GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding
          Fine-tuning, arXiv:2402.16829

    Relation to sentence-transformers (checked on identical embeddings in the tests):
        - Without a guide this is ``MultipleNegativesRankingLoss(scale=1/t, partition_mode="joint")`` with
          the same directions, except one deliberate difference: their ``doc_to_query`` block keeps ``j == i``,
          so the positive pair enters their partition twice and their loss is ``softplus`` of ours
          (bounded below by log 2). Here it is counted once.
        - With a guide this is ``GISTEmbedLoss`` (``contrast_anchors`` = q->q, ``contrast_positives`` = d->d)
          except: their d->d pool holds only the other queries' positives, ours also their hard negatives
          (the GTE pool, the same with and without a guide); they drop self-pairs in q->q / d->d through the
          guide threshold, we drop them always (their way keeps ``s(q_i, q_i)`` when ``g_pos >= 1``); they
          accept one hard negative per query, we accept ``G - 1``; and the ``none`` strategy is their
          ``absolute`` with margin 0.

    Args:
        temperature: Scores are divided by it (``1 / scale`` in sentence-transformers). 0.01 to 0.05 is
            usual with cosine or normalised embeddings; with unnormalised dot products DPR uses 1.
        similarity: ``dot`` or ``cos`` (``cos`` normalises the representations first).
        directions: Which candidate pools enter the partition (see above).
        guide_margin_strategy: ``None`` for no guide; otherwise ``none``, ``absolute`` or ``relative``.
        guide_margin: The margin of the ``absolute`` / ``relative`` strategies (>= 0).
        reduction: ``mean`` over queries (a scalar) or ``none`` (the ``(B,)`` per-query losses).

    Inputs:
        ``query`` ``(B, D)``, ``passage`` ``(B * G, D)`` grouped per query (row ``i * G`` is the positive,
        the next ``G - 1`` rows its hard negatives); with a guide also ``guide_query`` ``(B, D')`` and
        ``guide_passage`` ``(B * G, D')`` in the same layout, computed without gradient. Optionally
        ``passage_rows`` ``(B * G,)`` and ``known_rows`` ``(B, K)`` (corpus rows, -1 padding): candidates
        labelled relevant to the anchor's query leave its pool (:func:`labelled_false_negatives`).

    Recommendations:
        - Hard negatives mined by BM25 often include unlabelled positives; a guide (GISTEmbed) drops the
          ones a stronger model rates above the positive instead of pushing them away.
        - The q->q / d->d terms help most when batches hold only pairs or triplets; with many hard
          negatives per query q->p already gives a strong signal.
        - Pass ``passage_rows`` / ``known_rows`` when questions share passages: a copy of another query's
          positive, or a passage known to hold the answer, is then kept out of the pool instead of being
          pushed away as a negative.

    Example::

        loss_fn = ContrastiveLoss(temperature=0.05, similarity="cos",
                                  directions=("query_to_passage", "query_to_query",
                                              "passage_to_query", "passage_to_passage"))
        query = encoder(q_ids, q_mask, tower="query")        # (B, D)
        passage = encoder(p_ids, p_mask, tower="passage")    # (B * G, D)
        loss = loss_fn(query, passage)
        loss.backward()
    """

    def __init__(
        self,
        temperature: float = 0.05,
        similarity: Literal["dot", "cos"] = "dot",
        directions: tuple[str, ...] = ("query_to_passage",),
        guide_margin_strategy: Literal["none", "absolute", "relative"] | None = None,
        guide_margin: float = 0.0,
        reduction: Literal["mean", "none"] = "mean",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise RagkitError(f"temperature={temperature!r} must be > 0 (0.05 is a common choice)")
        if similarity not in SIMILARITIES:
            raise RagkitError(f"similarity={similarity!r} is not one of {', '.join(SIMILARITIES)}")
        directions = tuple(directions)
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown:
            raise RagkitError(f"unknown loss direction(s) {', '.join(map(repr, unknown))} (known: {', '.join(DIRECTIONS)})")
        if len(set(directions)) != len(directions):
            raise RagkitError(f"loss directions {directions} repeat a direction (list each at most once)")
        if "query_to_passage" not in directions:
            raise RagkitError(
                f"loss directions {directions} lack 'query_to_passage', the only pool holding the positive "
                f"(add 'query_to_passage')"
            )
        if guide_margin_strategy is not None and guide_margin_strategy not in GUIDE_MARGIN_STRATEGIES:
            raise RagkitError(
                f"guide_margin_strategy={guide_margin_strategy!r} is not one of {', '.join(GUIDE_MARGIN_STRATEGIES)}"
            )
        if not guide_margin >= 0:
            raise RagkitError(f"guide_margin={guide_margin!r} must be >= 0")
        if guide_margin and guide_margin_strategy in (None, "none"):
            raise RagkitError(
                f"guide_margin={guide_margin} has no effect with guide_margin_strategy={guide_margin_strategy!r} "
                f"(choose 'absolute' or 'relative', or set the margin to 0)"
            )
        if reduction not in ("mean", "none"):
            raise RagkitError(f"reduction={reduction!r} is not one of 'mean', 'none'")
        self.temperature = float(temperature)
        self.similarity = similarity
        # Order the directions canonically so the concatenated logits do not depend on how they were listed.
        self.directions = tuple(d for d in DIRECTIONS if d in directions)
        self.guide_margin_strategy = guide_margin_strategy
        self.guide_margin = float(guide_margin)
        self.reduction = reduction

    @property
    def guided(self) -> bool:
        return self.guide_margin_strategy is not None

    def extra_repr(self) -> str:
        guide = f", guide_margin_strategy={self.guide_margin_strategy!r}, guide_margin={self.guide_margin}" if self.guided else ""
        return f"temperature={self.temperature}, similarity={self.similarity!r}, directions={self.directions}{guide}"

    def forward(
        self,
        query: Tensor,
        passage: Tensor,
        guide_query: Tensor | None = None,
        guide_passage: Tensor | None = None,
        passage_rows: Tensor | None = None,
        known_rows: Tensor | None = None,
    ) -> Tensor:
        batch_size, group_size = _check_layout(query, passage, "query", "passage")
        _check_labels(passage_rows, known_rows, batch_size, group_size)
        if self.guided:
            if guide_query is None or guide_passage is None:
                raise ValueError("a guided loss needs guide_query and guide_passage (embeddings from the guide model)")
            if _check_layout(guide_query, guide_passage, "guide_query", "guide_passage") != (batch_size, group_size):
                raise ValueError(
                    f"guide embeddings {tuple(guide_query.shape)} / {tuple(guide_passage.shape)} do not match the batch "
                    f"{tuple(query.shape)} / {tuple(passage.shape)}"
                )
        elif guide_query is not None or guide_passage is not None:
            raise ValueError("guide embeddings given to a loss without a guide (set guide_margin_strategy)")

        # Low-precision logits at t = 0.05 lose the differences the softmax is about, so score in float32 at
        # least, also when the caller runs the loss inside an autocast region.
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = direction_scores(query.to(dtype), passage.to(dtype), group_size, self.directions, self.similarity)
            keep = candidate_masks(batch_size, group_size, self.directions, query.device)
            is_positive = positive_mask(batch_size, group_size, query.device)  # (B, B*G)

            if self.guided:
                with torch.no_grad():
                    guide = direction_scores(guide_query.to(dtype), guide_passage.to(dtype), group_size, self.directions, "cos")
                    g_pos = guide["query_to_passage"][is_positive]  # (B,)
                    threshold = guide_threshold(g_pos, self.guide_margin_strategy, self.guide_margin)  # (B, 1)
                    false_negative = guided_false_negatives(guide, threshold)
                false_negative["query_to_passage"] &= ~is_positive
                keep = {name: keep[name] & ~false_negative[name] for name in self.directions}
            if known_rows is not None:
                labelled = labelled_false_negatives(passage_rows, known_rows, group_size, self.directions)
                keep = {name: keep[name] & ~labelled[name] for name in self.directions}

            logits = torch.cat(
                [(scores[name] / self.temperature).masked_fill(~keep[name], float("-inf")) for name in self.directions], dim=1
            )  # (B, total candidates)
            positive_logit = scores["query_to_passage"][is_positive] / self.temperature  # (B,)
            loss = torch.logsumexp(logits, dim=1) - positive_logit  # (B,)
        return loss.mean() if self.reduction == "mean" else loss


def _check_labels(passage_rows: Tensor | None, known_rows: Tensor | None, batch_size: int, group_size: int) -> None:
    """Both label tensors or neither, in the shapes :func:`labelled_false_negatives` expects."""
    if (passage_rows is None) != (known_rows is None):
        raise ValueError("passage_rows and known_rows come together (the rows of the batch's passages and each query's known rows)")
    if passage_rows is None:
        return
    if tuple(passage_rows.shape) != (batch_size * group_size,) or known_rows.dim() != 2 or known_rows.size(0) != batch_size:
        raise ValueError(
            f"passage_rows {tuple(passage_rows.shape)} / known_rows {tuple(known_rows.shape)} do not match a batch of "
            f"{batch_size} queries x {group_size} passages (expected ({batch_size * group_size},) and ({batch_size}, K))"
        )


def _check_layout(query: Tensor, passage: Tensor, query_name: str, passage_name: str) -> tuple[int, int]:
    """``(B, G)`` of a query/passage pair in the grouped layout, or a ValueError naming what is off."""
    if query.dim() != 2 or passage.dim() != 2:
        raise ValueError(
            f"{query_name} and {passage_name} must be 2-D (rows, dim), got {tuple(query.shape)} and {tuple(passage.shape)}"
        )
    if query.size(1) != passage.size(1):
        raise ValueError(f"{query_name} dim {query.size(1)} != {passage_name} dim {passage.size(1)}")
    batch_size = query.size(0)
    if batch_size == 0 or passage.size(0) < batch_size or passage.size(0) % batch_size:
        raise ValueError(
            f"{passage_name} has {passage.size(0)} rows, expected a positive multiple of the {batch_size} queries "
            f"(one positive then the hard negatives per query)"
        )
    return batch_size, passage.size(0) // batch_size
