"""The sampled-gradient estimator of the cross-entropy over batch + cache (the package docstring derives it),
and how stale the cached embeddings are."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import DIRECTIONS, candidate_masks, direction_scores, labelled_false_negatives, positive_mask
from .store import Similarity


class CacheLossOutput(NamedTuple):
    loss: Tensor  # scalar: gradient of the estimator, value of ``cross_entropy``
    cross_entropy: Tensor  # scalar, detached: mean -log p(positive) over batch + allowed cache (stale scores)
    cache_mass: Tensor  # (B,) detached: softmax mass on the cache, Pi_C


def cache_loss(
    query: Tensor,
    passage: Tensor,
    drawn: Tensor,
    cache_lse: Tensor,
    valid: Tensor | None = None,
    *,
    temperature: float = 0.05,
    similarity: Similarity = "dot",
    directions: tuple[str, ...] = ("query_to_passage",),
    passage_rows: Tensor | None = None,
    known_rows: Tensor | None = None,
) -> CacheLossOutput:
    """Cross-entropy over in-batch candidates plus the whole cache, with the sampled-gradient estimator.

    Computes ``L^`` of the module docstring: the in-batch part is exact, the cache part uses the ``S``
    drawn items per query re-encoded by the live encoder. ``loss`` has the estimator's gradient and, for
    logging, the value of the exact cross-entropy ``-log p(positive)`` whose cache terms use the cached
    scores summarised by ``cache_lse`` (``loss = L^ + sg(L - L^)``).

    The in-batch candidates ``K`` are the joint partition of :class:`~ragkit.retriever.losses.ContrastiveLoss`
    with the same ``directions`` (DPR's query->passage alone, or GTE's four pools), so without a cache this
    is that loss exactly. The cache only ever joins the query->passage pool: ``Z_i`` gains
    ``sum_C exp s(q_i, c)``, the quantity the draw samples from. The estimator stays unbiased for any ``K``
    because every in-batch score is fresh and enters with its exact softmax weight.

    Args:
        query: ``(B, D)`` query embeddings.
        passage: ``(B * G, D)`` in-batch passages; row ``i * G`` is query ``i``'s positive, the rest of
            its group its hard negatives (the :class:`ContrastiveLoss` layout). Every query scores all rows.
        drawn: ``(B * S, D)`` re-encoded cache items, query-major (``draw.inputs()`` through the tower).
        cache_lse: ``(B,)`` ``draw.lse``: logsumexp of each query's allowed cache logits (-inf: none).
        valid: ``(B, S)`` ``draw.valid``; False rows are weighed by zero.
        temperature, similarity: must match those of the draw.
        directions: the in-batch pools, as in ``ContrastiveLoss`` (``query_to_passage`` must be one).
        passage_rows, known_rows: ``(B * G,)`` / ``(B, K)`` corpus rows; candidates labelled relevant to the
            anchor's query leave the in-batch pools, as in ``ContrastiveLoss``.
    """
    if similarity not in ("dot", "cos"):
        raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
    batch = query.size(0)
    if batch == 0 or passage.size(0) % batch or drawn.size(0) % batch:
        raise ValueError(f"passage ({passage.size(0)}) and drawn ({drawn.size(0)}) rows must be multiples "
                         f"of the {batch} queries")
    if "query_to_passage" not in directions:
        raise ValueError(f"directions {directions} lack 'query_to_passage', the pool the cache joins")
    group, samples = passage.size(0) // batch, drawn.size(0) // batch
    query, passage, drawn = query.float(), passage.float(), drawn.float()
    if similarity == "cos":
        query, passage, drawn = (F.normalize(t, dim=-1) for t in (query, passage, drawn))
    directions = tuple(d for d in DIRECTIONS if d in directions)
    scores = direction_scores(query, passage, group, directions, "dot")
    keep = candidate_masks(batch, group, directions, query.device)
    if known_rows is not None:
        labelled = labelled_false_negatives(passage_rows, known_rows, group, directions)
        keep = {name: keep[name] & ~labelled[name] for name in directions}
    batch_scores = torch.cat([scores[name] / temperature for name in directions], dim=1)  # (B, K)
    candidate = torch.cat([keep[name] for name in directions], dim=1)  # (B, K)
    drawn_scores = torch.einsum("bd,bsd->bs", query, drawn.view(batch, samples, -1)) / temperature  # (B, S)
    positive = scores["query_to_passage"][positive_mask(batch, group, query.device)] / temperature  # (B,)

    cache_lse = cache_lse.to(batch_scores.device, torch.float32)
    allowed = batch_scores.detach().masked_fill(~candidate, float("-inf"))  # (B, K)
    total = torch.logsumexp(torch.cat([allowed, cache_lse.unsqueeze(1)], dim=1), dim=1)  # (B,)
    batch_weight = (allowed - total.unsqueeze(1)).exp()  # (B, K), 0 outside the partition
    cache_mass = (cache_lse - total).exp()  # (B,)
    if valid is None:
        valid = torch.ones_like(drawn_scores, dtype=torch.bool)
    valid = valid.to(drawn_scores.device)
    drawn_mean = torch.where(valid, drawn_scores, 0.0).sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # (B,)

    estimate = -positive + (batch_weight * batch_scores).sum(dim=1) + cache_mass * drawn_mean  # (B,)
    cross_entropy = total - positive.detach()  # (B,)
    loss = (estimate + (cross_entropy - estimate).detach()).mean()
    return CacheLossOutput(loss=loss, cross_entropy=cross_entropy.mean(), cache_mass=cache_mass)


def staleness(cached: Tensor, fresh: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean ``||e_cached - e_fresh|| / ||e_fresh||`` over the (valid) re-encoded items ``(K, D)``; nan if none.

    It measures how far the encoder moved since the items were cached, i.e. how biased the cache's
    logits (and so the draw and ``Pi_C``) are.
    """
    cached, fresh = cached.detach().float().flatten(0, -2), fresh.detach().float().flatten(0, -2)
    ratio = (cached - fresh).norm(dim=-1) / fresh.norm(dim=-1).clamp(min=1e-12)  # (K,)
    if valid is not None:
        ratio = ratio[valid.flatten().to(ratio.device)]
    return ratio.mean() if ratio.numel() else torch.tensor(float("nan"))
