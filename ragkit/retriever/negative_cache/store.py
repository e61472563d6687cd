"""The negative cache itself: a fixed-capacity store of passage embeddings and the tokens to re-encode them,
scored against queries and drawn from in one process."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import IdsLike, _exclusions, _locate, pad_ids
from .sampling import _shard_step

Similarity = Literal["dot", "cos"]
Policy = Literal["fifo", "lru"]

# Rows of a low-precision (or cosine-scored) cache converted to fp32 at a time when scoring.
_SCORE_CHUNK_ROWS = 8192


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
