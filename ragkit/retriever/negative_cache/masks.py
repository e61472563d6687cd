"""Which cache entries a query may not use: its positives, passages known to hold its answer, and the
passages scored fresh in the batch."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

IdsLike = Tensor | Sequence[Iterable[int]]


def pad_ids(ids: IdsLike, device: torch.device | str | None = None) -> Tensor:
    """``(Q, E)`` int64 from per-query id collections, right-padded with -1 (a tensor passes through)."""
    if isinstance(ids, Tensor):
        if ids.dim() != 2:
            raise ValueError(f"per-query ids must be (Q, E), got shape {tuple(ids.shape)}")
        return ids.to(device=device, dtype=torch.long)
    rows = [list(row) for row in ids]
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for q, row in enumerate(rows):
        out[q, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out.to(device)


def _locate(sorted_ids: Tensor, wanted: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of ``wanted`` in ``sorted_ids`` and whether each is there (-1 never is)."""
    pos = torch.searchsorted(sorted_ids, wanted).clamp(max=sorted_ids.numel() - 1)
    return pos, (sorted_ids[pos] == wanted) & (wanted >= 0)


def build_cache_mask(
    cache_ids: Tensor,
    positive_ids: IdsLike,
    excluded_ids: IdsLike | None = None,
    batch_ids: Tensor | Iterable[int] | None = None,
) -> Tensor:
    """``(Q, N)`` bool, True where query ``q`` must not use cache entry ``n``.

    Args:
        cache_ids: ``(N,)`` unique passage ids of the cache entries (``cache.ids[:len(cache)]``).
        positive_ids: per query, its positives (``(Q, P)`` padded with -1, or lists of ids).
        excluded_ids: per query, further ids to keep out, e.g. passages that contain its answer.
        batch_ids: ids scored fresh in this batch, kept out for every query so no passage counts twice.
    """
    excluded = pad_ids(positive_ids, cache_ids.device)
    if excluded_ids is not None:
        extra = pad_ids(excluded_ids, cache_ids.device)
        if extra.size(0) != excluded.size(0):
            raise ValueError(f"{excluded.size(0)} rows of positive ids but {extra.size(0)} of excluded ids")
        excluded = torch.cat([excluded, extra], dim=1)  # (Q, E)
    mask = torch.zeros((excluded.size(0), cache_ids.numel()), dtype=torch.bool, device=cache_ids.device)
    rows, columns, shared = _exclusions(cache_ids, excluded, batch_ids)
    mask[rows, columns] = True
    mask[:, shared] = True
    return mask


def _exclusions(
    cache_ids: Tensor, excluded: Tensor, batch_ids: Tensor | Iterable[int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Where ``excluded`` (Q, E) and ``batch_ids`` hit ``cache_ids`` (N,): the (row, column) pairs of
    per-query exclusions and the columns excluded for every query. Never builds a (Q, N) tensor."""
    empty = torch.zeros(0, dtype=torch.long, device=cache_ids.device)
    if cache_ids.numel() == 0:
        return empty, empty, empty
    sorted_ids, order = cache_ids.sort()
    if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
        raise ValueError("cache_ids must be unique")
    rows = columns = shared = empty
    if excluded.numel():
        pos, hit = _locate(sorted_ids, excluded)
        rows = torch.arange(excluded.size(0), device=cache_ids.device).unsqueeze(1).expand_as(excluded)[hit]
        columns = order[pos[hit]]
    if batch_ids is not None:
        batch_ids = torch.as_tensor(batch_ids, dtype=torch.long, device=cache_ids.device).flatten()
        if batch_ids.numel():
            pos, hit = _locate(sorted_ids, batch_ids)
            shared = order[pos[hit]]
    return rows, columns, shared
