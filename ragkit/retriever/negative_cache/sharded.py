"""The negative cache under torch.distributed: one shard per rank, drawn from exactly over their union."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .masks import IdsLike, pad_ids
from .sampling import _candidates, _choose_shard, _pad_columns, _shard_step, _top_k_threshold
from .store import CacheDraw, NegativeCache, Similarity, _assemble_draw


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(tensor: Tensor, group) -> Tensor:
    """``(world, *tensor.shape)``, rank order, no gradient. Every rank must pass the same shape."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _all_gather_padded(ids: Tensor, group) -> Tensor:
    """Gather ``(rows, E_r)`` id tensors whose width differs by rank: ``(world, rows, max E)``, -1 padded."""
    width = _all_gather(torch.tensor([ids.size(-1)], device=ids.device), group).max().item()
    pad = ids.new_full((*ids.shape[:-1], width - ids.size(-1)), -1)
    return _all_gather(torch.cat([ids, pad], dim=-1), group)


def distributed_draw(
    cache: NegativeCache,
    query: Tensor,
    *,
    generator: torch.Generator | None,
    shard_generator: torch.Generator | None,
    num_samples: int = 1,
    temperature: float = 0.05,
    similarity: Similarity = "dot",
    excluded_ids: IdsLike | None = None,
    batch_ids: Tensor | Iterable[int] | None = None,
    top_k: int | None = None,
    group=None,
) -> CacheDraw:
    """:meth:`NegativeCache.draw` over a cache sharded one shard per rank; returns the local queries' draw.

    Every rank gathers all queries (equal local batch sizes), draws one candidate per query and sample
    from its own shard and reports its logsumexp; the shard choice is made identically on every rank
    from ``shard_generator`` (same seed on all ranks, a different one from ``generator``), and each rank
    keeps the chosen items (tokens, ids, cached embeddings) of its own queries. The result is an exact
    draw from the softmax over the union of the shards (:func:`sharded_gumbel_max_sample` is the same
    computation in one process). ``draw.lse`` is the logsumexp over all shards. ``excluded_ids`` are the
    local queries' own; ``batch_ids`` the local batch's passages (the union over ranks is excluded).
    Without an initialised process group (or with one process) this is ``cache.draw``. It is a collective:
    every rank calls it with the same ``num_samples`` and ``top_k``, and passes ``excluded_ids`` /
    ``batch_ids`` on all ranks or on none.
    """
    rank, world = _world(group)
    if world == 1:
        return cache.draw(query, num_samples=num_samples, generator=generator, temperature=temperature,
                          similarity=similarity, excluded_ids=excluded_ids, batch_ids=batch_ids, top_k=top_k)
    local = query.size(0)
    device = cache.device
    everyone = _all_gather(query.detach().to(device, torch.float32), group).flatten(0, 1)  # (B, D)
    excluded = None
    if excluded_ids is not None:
        excluded = _all_gather_padded(pad_ids(excluded_ids, device), group).flatten(0, 1)  # (B, E)
    shared = None
    if batch_ids is not None:
        mine = torch.as_tensor(batch_ids, dtype=torch.long, device=device).flatten().unsqueeze(0)
        shared = _all_gather_padded(mine, group).flatten()  # (world * M,) with -1 padding
    logits = cache._logits(everyone, temperature, similarity, None, excluded, shared)  # (B, n_r)

    threshold = None
    if top_k is not None:
        own_top = _pad_columns(_candidates(logits, top_k)[0], top_k)  # (B, k)
        threshold = _top_k_threshold(_all_gather(own_top, group), top_k)
    candidate, lse = _shard_step(logits, top_k, num_samples, generator, threshold)  # (B, S), (B,)
    shard_lse = _all_gather(lse, group).T  # (B, R)
    payload = {name: _all_gather(value, group) for name, value in cache._payload(candidate).items()}  # (R, B, S, ...)
    shard, _ = _choose_shard(shard_lse, payload["slot"], num_samples, shard_generator)  # (B, S)

    rows = slice(rank * local, (rank + 1) * local)
    shard = shard[rows]  # (b, S)
    pick = shard.clamp(min=0)
    chosen = {}
    for name, value in payload.items():
        value = value[:, rows]  # (R, b, S, ...)
        index = pick.view(1, *pick.shape, *([1] * (value.dim() - 3))).expand(1, *value.shape[1:])
        chosen[name] = value.gather(0, index).squeeze(0)
    chosen["slot"] = torch.where(shard >= 0, chosen["slot"], -1)
    return _assemble_draw(chosen, torch.logsumexp(shard_lse[rows], dim=1), shard)


def refresh_drawn(cache: NegativeCache, draw: CacheDraw, fresh: Tensor, group=None) -> None:
    """Write the re-encoded embeddings ``fresh`` (Q * S, D) of a draw back into the cache (and, under
    ``lru``, mark them used). Under torch.distributed each item goes to the rank that owns it; all ranks
    must call this. An item whose slot was reused since the draw is skipped."""
    queries, samples = draw.slot.shape
    fresh = fresh.detach().to(cache.device, torch.float32).view(queries, samples, -1)  # (Q, S, D)
    fields = (draw.shard, draw.slot, draw.ids, fresh)
    rank, world = _world(group)
    if world > 1:
        fields = tuple(_all_gather(f.to(cache.device), group) for f in fields)
    shard, slot, ids, fresh = (f.reshape(-1, *f.shape[(3 if world > 1 else 2):]) for f in fields)
    owned = (slot >= 0) & (shard == rank)
    owned &= cache.ids[slot.clamp(min=0)] == ids
    cache.update(slot[owned], fresh[owned])
