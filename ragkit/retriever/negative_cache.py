"""Negative cache: passages from earlier steps as extra negatives, drawn by Gumbel-Max sampling.

Reference: Lindgren, Reddi, Guo, Kumar, "Efficient Training of Retrieval Models using Negative Cache",
NeurIPS 2021 (https://openreview.net/forum?id=824xC-SgWgU).

The softmax cross-entropy of a query against its batch *plus* ``N`` cached passages has a gradient that
touches every cached passage's score, which would mean ``N`` passage-tower passes per step. The cache
keeps, for ``N`` passages, the embedding computed when the passage was last encoded (stale by now) and
its tokens. Each step draws, per query, cached passages from the softmax over their stale scores,
re-encodes only those with the live encoder, and uses an estimator whose gradient equals the full
cross-entropy gradient in expectation (exactly so while the cached embeddings are current). Cost per step:
``O(batch)`` passage encodings and one ``(Q, N)`` score matrix, instead of ``O(N)`` encodings.

The estimator (:func:`cache_loss`). For query ``i`` let ``K`` be the in-batch passages (fresh scores
``s_k``, its positive ``p`` among them) and ``C`` the cached passages it may use (scores ``s_c``).
Cross-entropy ``L = -s_p + log(sum_K exp s_k + sum_C exp s_c)`` has gradient::

    dL = -ds_p + sum_K pi_k ds_k + Pi_C E_{c ~ q}[ds_c]

with ``pi`` the softmax over ``K u C``, ``Pi_C = sum_C pi_c`` and ``q(c) = exp s_c / sum_C exp s_c``. The
training loss::

    L^ = -s_p + sum_K sg(pi_k) s_k + sg(Pi_C) * mean_s s_{c_s},   c_1..c_S ~ q (Gumbel-Max, stale scores)

with ``s_{c_s}`` scored from the *re-encoded* embedding has ``E[dL^] = dL``. With ``K = {p}`` it is the
paper's ``(1 - p_pos) (s_c - s_pos)`` (``negative_cache/losses.py``, ``CacheClassificationLoss``). Drawing
``j`` from the whole softmax and using ``-s_p + s_j`` is unbiased too; ``L^`` is that estimator with the
in-batch outcomes averaged out exactly (their scores are fresh and already computed), so only the cache
part is sampled and the variance is lower.

One training step, single process::

    draw = cache.draw(query.detach(), generator=g, temperature=t,
                      excluded_ids=positive_ids, batch_ids=batch_passage_ids)
    drawn = model(**draw.inputs(), tower="passage")                  # (B * S, D), with gradient
    out = cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=t)
    out.loss.backward()
    refresh_drawn(cache, draw, drawn)                                # drawn items get fresh embeddings
    cache.add(passage.detach(), passage_ids, **passage_tokens)       # input_ids, attention_mask, token_type_ids

Under ``torch.distributed`` every rank holds one shard of the cache; :func:`distributed_draw` replaces
``cache.draw`` and returns the same :class:`CacheDraw` for the rank's local queries, drawn exactly from
the softmax over the union of all shards (see :func:`sharded_gumbel_max_sample`). The caller then
gathers ``drawn``, ``draw.lse`` and ``draw.valid`` over ranks like the other representations and
computes the global loss.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .losses import DIRECTIONS, candidate_masks, direction_scores, positive_mask

Similarity = Literal["dot", "cos"]
Policy = Literal["fifo", "lru"]
IdsLike = Tensor | Sequence[Iterable[int]]

# Gumbel noise is drawn this many elements at a time at most, so many samples over a large cache do not
# materialise an (S, Q, N) tensor at once.
_NOISE_ELEMENTS = 1 << 22
# Rows of a low-precision (or cosine-scored) cache converted to fp32 at a time when scoring.
_SCORE_CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------------------------------
# Gumbel-Max sampling
# ---------------------------------------------------------------------------------------------------


def _gumbel_argmax(values: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """``(Q, S)`` column indices, each an independent draw from ``softmax(values[q])``; -1 for a row with
    no finite entry.

    ``argmax_j(l_j + G_j)`` with i.i.d. standard Gumbel ``G_j = -log(-log U_j)``, ``U_j ~ U[0, 1)``, is
    distributed as ``softmax(l)``.
    """
    rows, columns = values.shape
    out = torch.full((rows, num_samples), -1, dtype=torch.long, device=values.device)
    if rows == 0 or columns == 0 or num_samples == 0:
        return out
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    chunk = max(1, _NOISE_ELEMENTS // (rows * columns))
    for start in range(0, num_samples, chunk):
        count = min(chunk, num_samples - start)
        perturbed = torch.rand((count, rows, columns), dtype=values.dtype, device=values.device,
                               generator=generator)  # (c, Q, K)
        # In place, U -> l + G. U = 0 gives G = -inf (that entry cannot win) and U < 1 keeps G finite
        # otherwise, so a masked -inf logit never becomes nan. (torch's exponential_ is slower than this.)
        perturbed.log_().neg_().log_().neg_().add_(values)
        best, index = perturbed.max(dim=-1)  # (c, Q)
        out[:, start : start + count] = torch.where(torch.isneginf(best), -1, index).T
    return out


def _take(index: Tensor | None, positions: Tensor) -> Tensor:
    """Map ``positions`` (Q, S) into columns of ``index`` (Q, K); -1 stays -1."""
    if index is None:
        return positions
    taken = index.gather(1, positions.clamp(min=0))
    return torch.where(positions >= 0, taken, torch.full_like(taken, -1))


def gumbel_max_sample(
    logits: Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Independent draws (with replacement) from ``softmax(logits[q])`` for every row, by Gumbel-Max.

    Args:
        logits: ``(Q, N)`` unnormalised log-probabilities.
        num_samples: draws per row.
        generator: source of the Gumbel noise (on the logits' device); None uses the global one.
        top_k: draw from the softmax restricted to each row's ``top_k`` largest (unmasked) logits.
        mask: ``(Q, N)`` bool, True where an entry must never be drawn (applied before ``top_k``).

    Returns:
        ``(Q, num_samples)`` int64 column indices; -1 in rows where every entry is masked.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (Q, N), got shape {tuple(logits.shape)}")
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    values, index = _candidates(logits, top_k)
    return _take(index, _gumbel_argmax(values, num_samples, generator))


def _candidates(logits: Tensor, top_k: int | None) -> tuple[Tensor, Tensor | None]:
    """The logits a draw may pick from: all of them, or each row's ``top_k`` with their column indices."""
    if top_k is None or top_k >= logits.size(1):
        return logits, None
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    values, index = logits.topk(top_k, dim=1)  # (Q, k), (Q, k)
    return values, index


def _pad_columns(values: Tensor, width: int) -> Tensor:
    """Right-pad ``(Q, K)`` with -inf to ``(Q, width)`` so shards of different sizes can be gathered."""
    if values.size(1) == width:
        return values
    pad = values.new_full((values.size(0), width - values.size(1)), float("-inf"))
    return torch.cat([values, pad], dim=1)


def _top_k_threshold(padded_shard_values: Tensor, top_k: int) -> Tensor:
    """``(Q,)`` the ``top_k``-th largest logit over all shards, from each shard's own top-k ``(R, Q, k)``.

    The global top-k lies inside the union of the per-shard top-k lists, so its k-th value is exact.
    """
    merged = padded_shard_values.permute(1, 0, 2).flatten(1)  # (Q, R * k)
    return merged.topk(top_k, dim=1).values[:, -1]


class ShardedSample(NamedTuple):
    """An exact draw from the softmax over the union of shards."""

    shard: Tensor  # (Q, S) int64, owning shard; -1 when no shard has a candidate
    index: Tensor  # (Q, S) int64, column within that shard; -1 likewise
    lse: Tensor  # (Q,) logsumexp of the allowed logits over all shards (-inf when none)


def _shard_step(
    logits: Tensor, top_k: int | None, num_samples: int, generator: torch.Generator | None,
    threshold: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One shard's part: a draw from its own softmax ``(Q, S)`` and its logsumexp ``(Q,)``."""
    values, index = _candidates(logits, top_k)
    if threshold is not None:
        values = values.masked_fill(values < threshold.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(values.float(), dim=1)  # (Q,)
    return _take(index, _gumbel_argmax(values, num_samples, generator)), lse


def _choose_shard(shard_lse: Tensor, shard_candidates: Tensor, num_samples: int,
                  shard_generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Second Gumbel-Max over shards weighted by ``exp(lse_r)``: ``shard_lse`` (Q, R), candidates (R, Q, S)."""
    shard = _gumbel_argmax(shard_lse, num_samples, shard_generator)  # (Q, S)
    picked = shard_candidates.permute(1, 2, 0).gather(2, shard.clamp(min=0).unsqueeze(2)).squeeze(2)  # (Q, S)
    return shard, torch.where(shard >= 0, picked, torch.full_like(picked, -1))


def sharded_gumbel_max_sample(
    shard_logits: Sequence[Tensor],
    num_samples: int = 1,
    generators: Sequence[torch.Generator | None] | None = None,
    shard_generator: torch.Generator | None = None,
    top_k: int | None = None,
    masks: Sequence[Tensor | None] | None = None,
) -> ShardedSample:
    """Draw from ``softmax(concat(shard_logits))`` while each shard only reports one candidate + a logsumexp.

    Shard ``r`` draws a candidate ``j_r`` from its own softmax by Gumbel-Max (generator ``generators[r]``)
    and reports ``lse_r = logsumexp(logits_r)``; a second Gumbel-Max over ``lse`` (``shard_generator``)
    picks the shard ``r``, and the result is ``(r, j_r)``. This is exact because
    ``P(r, j) = exp(lse_r) / sum_r' exp(lse_r') * exp(l_j) / exp(lse_r) = exp(l_j) / sum_all exp(l)``:
    the shard's weight cancels the within-shard normaliser, and the two draws use independent noise.

    With ``top_k`` the shards first agree on the global k-th largest logit (each sends its own top-k), then
    each keeps its logits at or above it: the draw is from the softmax over the global top-k (ties at the
    threshold are all kept). :func:`distributed_draw` runs exactly these steps with one shard per rank.

    Args:
        shard_logits: ``R`` tensors ``(Q, N_r)``, one per shard, same queries in the same order.
        generators: one per shard (each rank's own); the within-shard noise.
        shard_generator: the shard choice's noise; must not share a seed with ``generators``.
        masks: optional ``(Q, N_r)`` bool per shard, True where an entry must never be drawn.
    """
    count = len(shard_logits)
    generators = list(generators) if generators is not None else [None] * count
    masks = list(masks) if masks is not None else [None] * count
    if len(generators) != count or len(masks) != count:
        raise ValueError(f"got {count} shards but {len(generators)} generators and {len(masks)} masks")
    logits = [lg if m is None else lg.masked_fill(m, float("-inf")) for lg, m in zip(shard_logits, masks)]
    threshold = None
    if top_k is not None:
        tops = torch.stack([_pad_columns(_candidates(lg, top_k)[0], top_k) for lg in logits])  # (R, Q, k)
        threshold = _top_k_threshold(tops, top_k)
    steps = [_shard_step(lg, top_k, num_samples, gen, threshold) for lg, gen in zip(logits, generators)]
    candidates = torch.stack([cand for cand, _ in steps])  # (R, Q, S)
    shard_lse = torch.stack([lse for _, lse in steps], dim=1)  # (Q, R)
    shard, index = _choose_shard(shard_lse, candidates, num_samples, shard_generator)
    return ShardedSample(shard=shard, index=index, lse=torch.logsumexp(shard_lse, dim=1))


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CacheDraw:
    """Cache items drawn for a batch of queries, ready to be re-encoded. ``S`` draws per query."""

    lse: Tensor  # (Q,) logsumexp of the query's allowed cache logits; -inf when it has none
    valid: Tensor  # (Q, S) bool: False when the query had no allowed cache item
    shard: Tensor  # (Q, S) int64 rank owning the item (0 in one process); -1 when invalid
    slot: Tensor  # (Q, S) int64 slot in the owner's cache; -1 when invalid
    ids: Tensor  # (Q, S) int64 passage ids; -1 when invalid
    cached: Tensor  # (Q, S, D) fp32 cached (stale) embeddings; 0 when invalid
    input_ids: Tensor  # (Q * S, L') int64, query-major; an invalid row is one token 0
    attention_mask: Tensor  # (Q * S, L') int64
    token_type_ids: Tensor  # (Q * S, L') int64

    def inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for the passage tower. Invalid rows hold one real token, so they encode to a
        finite embedding that :func:`cache_loss` weighs by zero."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}


class NegativeCache:
    """Fixed-capacity store of passage embeddings and the tokens to re-encode them.

    Everything lives in tensors allocated once: embeddings ``(N, D)`` (fp32, bf16 or fp16), passage ids
    ``(N,)`` int64, token ids ``(N, L)`` int32 with lengths and the start of the second text segment
    ``(N,)`` int32 each (enough to rebuild ``attention_mask`` and ``token_type_ids`` of a right-padded
    row), and one int64 stamp per slot for the replacement order. :attr:`nbytes` is their total.

    Replacement: ``fifo`` evicts the item added longest ago; ``lru`` evicts the item added or refreshed
    (:meth:`update`) longest ago. Slots fill in order, so the filled ones are always ``[0, len(cache))``.
    A passage id is stored at most once: adding an id that is already cached overwrites its slot.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        policy: Policy = "fifo",
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1 or dim < 1 or max_length < 1:
            raise ValueError(f"capacity, dim and max_length must be >= 1, got {capacity}, {dim}, {max_length}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if policy not in ("fifo", "lru"):
            raise ValueError(f"policy must be 'fifo' or 'lru', got {policy!r}")
        self.capacity, self.dim, self.max_length, self.policy = capacity, dim, max_length, policy
        self.device = torch.device(device)
        # Only the filled prefix is ever read, so the bulk is left uninitialised rather than zeroed.
        self.embeddings = torch.empty((capacity, dim), dtype=dtype, device=self.device)  # (N, D)
        self.input_ids = torch.empty((capacity, max_length), dtype=torch.int32, device=self.device)  # (N, L)
        self.ids = torch.full((capacity,), -1, dtype=torch.long, device=self.device)  # (N,)
        self.lengths = torch.zeros(capacity, dtype=torch.int32, device=self.device)  # (N,)
        self.segment_starts = torch.zeros(capacity, dtype=torch.int32, device=self.device)  # (N,)
        self.stamps = torch.zeros(capacity, dtype=torch.long, device=self.device)  # (N,)
        self._size = 0
        self._clock = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.nbytes for t in self._tensors().values())

    def _tensors(self) -> dict[str, Tensor]:
        return {"embeddings": self.embeddings, "input_ids": self.input_ids, "ids": self.ids,
                "lengths": self.lengths, "segment_starts": self.segment_starts, "stamps": self.stamps}

    def _next_stamps(self, count: int) -> Tensor:
        stamps = torch.arange(self._clock, self._clock + count, dtype=torch.long, device=self.device)
        self._clock += count
        return stamps

    def add(
        self,
        embeddings: Tensor,
        ids: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Store passages, evicting by the policy when full; returns the slots written, one per distinct id
        kept, in call order.

        Args:
            embeddings: ``(k, D)`` passage embeddings (detached; converted to the cache's dtype).
            ids: ``(k,)`` non-negative passage ids. Within one call the last occurrence of an id wins.
            input_ids, attention_mask: ``(k, l)`` right-padded token rows, ``l <= max_length`` (longer
                rows are accepted when the extra columns are padding).
            token_type_ids: ``(k, l)`` of a text pair (``0..0 1..1`` then 0 padding); None for one segment.
        """
        embeddings, ids = embeddings.detach(), ids.detach().to(self.device, torch.long).flatten()
        count = ids.numel()
        if embeddings.shape != (count, self.dim):
            raise ValueError(f"embeddings must be ({count}, {self.dim}), got {tuple(embeddings.shape)}")
        if count and int(ids.min()) < 0:
            raise ValueError("passage ids must be >= 0 (-1 marks padding)")
        tokens, lengths, segments = self._encode_tokens(input_ids, attention_mask, token_type_ids, count)
        keep = _last_occurrences(ids)[-self.capacity :]  # a call larger than the cache keeps its newest
        embeddings, ids = embeddings.to(self.device)[keep], ids[keep]
        tokens, lengths, segments = tokens[keep], lengths[keep], segments[keep]
        stamps = self._next_stamps(ids.numel())

        size = self._size
        slots = torch.empty_like(ids)
        present = torch.zeros_like(ids, dtype=torch.bool)
        if size:
            sorted_ids, order = self.ids[:size].sort()
            pos, present = _locate(sorted_ids, ids)
            slots[present] = order[pos[present]]
            # Overwritten items get their new stamps first, so the eviction below never picks them.
            self.stamps[slots[present]] = stamps[present]
        fresh = int((~present).sum())
        free = self.capacity - size
        if fresh <= free:
            targets = torch.arange(size, size + fresh, device=self.device)
        else:
            victims = self.stamps[:size].topk(fresh - free, largest=False).indices
            targets = torch.cat([torch.arange(size, self.capacity, device=self.device), victims])
        slots[~present] = targets
        self._size = min(self.capacity, size + fresh)

        self.embeddings[slots] = embeddings.to(self.embeddings.dtype)
        self.ids[slots] = ids
        self.input_ids[slots] = tokens
        self.lengths[slots] = lengths
        self.segment_starts[slots] = segments
        self.stamps[slots] = stamps
        return slots

    def _encode_tokens(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, count: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, L)`` int32 token ids padded with 0, lengths ``(k,)``, second-segment starts ``(k,)``."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if input_ids.dim() != 2 or input_ids.size(0) != count or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be ({count}, l), got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        width = input_ids.size(1)
        lengths = attention_mask.sum(dim=1)  # (k,)
        columns = torch.arange(width, device=self.device)  # (l,)
        inside = columns.unsqueeze(0) < lengths.unsqueeze(1)  # (k, l)
        if not torch.equal(attention_mask.bool(), inside):
            raise ValueError("attention_mask rows must be right-padded (ones then zeros); "
                             "tokenize with padding_side='right'")
        if count and int(lengths.max()) > self.max_length:
            raise ValueError(f"a passage has {int(lengths.max())} tokens but the cache holds {self.max_length} "
                             f"(build it with max_length = the passage max length)")
        if token_type_ids is None:
            segments = lengths
        else:
            second = token_type_ids.to(self.device).bool()  # (k, l)
            segments = torch.where(second.any(dim=1), second.int().argmax(dim=1), lengths)
            expected = (columns.unsqueeze(0) >= segments.unsqueeze(1)) & inside
            if not torch.equal(second, expected):
                raise ValueError("token_type_ids must be 0 for the first segment, 1 for the second, 0 on padding")
        tokens = torch.zeros((count, self.max_length), dtype=torch.int32, device=self.device)
        used = min(width, self.max_length)
        tokens[:, :used] = input_ids[:, :used].masked_fill(~inside[:, :used], 0)
        return tokens, lengths.int(), segments.int()

    def update(self, slots: Tensor, embeddings: Tensor) -> None:
        """Overwrite the embeddings at ``slots`` (k,) with re-encoded ones (k, D); under ``lru`` this also
        marks them as just used. A slot listed twice keeps its last embedding."""
        slots = slots.detach().to(self.device, torch.long).flatten()
        embeddings = embeddings.detach().to(self.device)
        if embeddings.shape != (slots.numel(), self.dim):
            raise ValueError(f"embeddings must be ({slots.numel()}, {self.dim}), got {tuple(embeddings.shape)}")
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self._size:
            raise ValueError(f"slots must lie in [0, {self._size}), the filled part of the cache")
        keep = _last_occurrences(slots)
        slots = slots[keep]
        self.embeddings[slots] = embeddings[keep].to(self.embeddings.dtype)
        if self.policy == "lru":
            self.stamps[slots] = self._next_stamps(slots.numel())

    def tokens(self, slots: Tensor) -> dict[str, Tensor]:
        """Passage-tower inputs ``(k, l)`` int64 for ``slots`` (k,), trimmed to their longest row."""
        slots = slots.to(self.device, torch.long)
        return _token_inputs(self.input_ids[slots], self.lengths[slots], self.segment_starts[slots])

    def scores(self, query: Tensor, temperature: float = 1.0, similarity: Similarity = "dot") -> Tensor:
        """``(Q, len(cache))`` fp32 logits ``sim(query, cached) / temperature`` (no gradient)."""
        if similarity not in ("dot", "cos"):
            raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
        query = query.detach().to(self.device, torch.float32)  # (Q, D)
        if similarity == "cos":
            query = F.normalize(query, dim=-1)
        query = query / temperature  # scaling the (Q, D) side saves a pass over the (Q, N) logits
        size = self._size
        if self.embeddings.dtype == torch.float32 and similarity == "dot":
            return query @ self.embeddings[:size].T
        out = torch.empty((query.size(0), size), dtype=torch.float32, device=self.device)  # (Q, n)
        for start in range(0, size, _SCORE_CHUNK_ROWS):
            stop = min(start + _SCORE_CHUNK_ROWS, size)
            block = self.embeddings[start:stop].float()  # (c, D)
            scores = query @ block.T  # (Q, c)
            if similarity == "cos":
                scores /= block.norm(dim=1).clamp(min=1e-12)
            out[:, start:stop] = scores
        return out

    def _logits(self, query: Tensor, temperature: float, similarity: Similarity, mask: Tensor | None,
                excluded_ids: IdsLike | None, batch_ids: Tensor | Iterable[int] | None) -> Tensor:
        """Cache logits with the disallowed entries at -inf."""
        logits = self.scores(query, temperature, similarity)  # (Q, n)
        if excluded_ids is not None or batch_ids is not None:
            per_query = pad_ids(excluded_ids if excluded_ids is not None else [[]] * query.size(0), self.device)
            if per_query.size(0) != logits.size(0):
                raise ValueError(f"excluded_ids has {per_query.size(0)} rows for {logits.size(0)} queries")
            rows, columns, shared = _exclusions(self.ids[: self._size], per_query, batch_ids)
            logits[rows, columns] = float("-inf")
            logits[:, shared] = float("-inf")
        if mask is not None:
            if mask.shape != logits.shape:
                raise ValueError(f"mask must be {tuple(logits.shape)} (queries, len(cache)), got {tuple(mask.shape)}")
            logits.masked_fill_(mask.to(self.device), float("-inf"))
        return logits

    def draw(
        self,
        query: Tensor,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        temperature: float = 0.05,
        similarity: Similarity = "dot",
        mask: Tensor | None = None,
        excluded_ids: IdsLike | None = None,
        batch_ids: Tensor | Iterable[int] | None = None,
        top_k: int | None = None,
    ) -> CacheDraw:
        """Draw ``num_samples`` items per query from the softmax over its allowed cache logits.

        Args:
            query: ``(Q, D)`` query embeddings (used without gradient).
            temperature, similarity: as in the loss, so the cache logits match the batch logits.
            mask: ``(Q, len(cache))`` bool, True where a query must not use an entry.
            excluded_ids: per query, passage ids to keep out (its positives, passages with its answer).
            batch_ids: passage ids scored fresh in this batch, kept out for every query.
            top_k: restrict each query's softmax to its ``top_k`` highest cache logits.
        """
        logits = self._logits(query, temperature, similarity, mask, excluded_ids, batch_ids)
        slot, lse = _shard_step(logits, top_k, num_samples, generator, None)
        return self._draw_from_slots(slot, lse, torch.zeros_like(slot))

    def _payload(self, slot: Tensor) -> dict[str, Tensor]:
        """What the querying side needs of the items at ``slot`` (Q, S); zeros where ``slot`` is -1."""
        valid = slot >= 0
        safe = slot.clamp(min=0)
        cached = self.embeddings[safe].float()  # (Q, S, D)
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        return {
            "slot": slot,
            "ids": torch.where(valid, self.ids[safe], zero - 1),
            # An empty cache has uninitialised rows, so invalid entries are replaced, not multiplied.
            "cached": torch.where(valid.unsqueeze(-1), cached, torch.zeros_like(cached)),
            "input_ids": torch.where(valid.unsqueeze(-1), self.input_ids[safe], 0),  # (Q, S, L) int32
            "lengths": torch.where(valid, self.lengths[safe], 1),
            "segment_starts": torch.where(valid, self.segment_starts[safe], 1),
        }

    def _draw_from_slots(self, slot: Tensor, lse: Tensor, shard: Tensor) -> CacheDraw:
        return _assemble_draw(self._payload(slot), lse, torch.where(slot >= 0, shard, -1))

    def state_dict(self) -> dict[str, Tensor | int | str]:
        """The filled part of the cache and its clock, for a resumable checkpoint."""
        size = self._size
        state: dict[str, Tensor | int | str] = {k: t[:size].clone() for k, t in self._tensors().items()}
        state.update(clock=self._clock, policy=self.policy)
        return state

    def load_state_dict(self, state: dict[str, Tensor | int | str]) -> None:
        """Restore :meth:`state_dict` output into a cache of the same capacity, dim, max length and dtype."""
        embeddings = state["embeddings"]
        size = embeddings.shape[0]
        fits = (size <= self.capacity and embeddings.shape[1:] == self.embeddings.shape[1:]
                and embeddings.dtype == self.embeddings.dtype
                and state["input_ids"].shape[1:] == self.input_ids.shape[1:])
        if not fits:
            raise ValueError("the saved cache does not fit this one (capacity, dim, max_length or dtype differ)")
        for key, target in self._tensors().items():
            target[:size] = state[key].to(self.device)
        self._size, self._clock, self.policy = size, int(state["clock"]), str(state["policy"])


def _last_occurrences(values: Tensor) -> Tensor:
    """Sorted positions of the last occurrence of each distinct value in ``values`` (k,)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=values.device)
    last.scatter_reduce_(0, inverse, positions, reduce="amax")
    return last.sort().values


def _token_inputs(input_ids: Tensor, lengths: Tensor, segment_starts: Tensor) -> dict[str, Tensor]:
    """Rebuild int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` ``(k, l)`` of right-padded rows,
    trimmed to the longest (at least one column)."""
    width = max(int(lengths.max()) if lengths.numel() else 1, 1)
    columns = torch.arange(width, device=input_ids.device)  # (l,)
    attention = columns < lengths.unsqueeze(-1)  # (k, l)
    second = (columns >= segment_starts.unsqueeze(-1)) & attention
    return {"input_ids": input_ids[..., :width].long(), "attention_mask": attention.long(),
            "token_type_ids": second.long()}


def _assemble_draw(payload: dict[str, Tensor], lse: Tensor, shard: Tensor) -> CacheDraw:
    """A :class:`CacheDraw` from per-(query, sample) payload tensors ``(Q, S, ...)``."""
    slot = payload["slot"]
    tokens = _token_inputs(payload["input_ids"].flatten(0, 1), payload["lengths"].flatten(),
                           payload["segment_starts"].flatten())
    return CacheDraw(lse=lse, valid=slot >= 0, shard=shard, slot=slot, ids=payload["ids"],
                     cached=payload["cached"], **tokens)


# ---------------------------------------------------------------------------------------------------
# torch.distributed: one shard per rank
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Loss and staleness
# ---------------------------------------------------------------------------------------------------


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
