"""The training step with cached negatives: the negative cache, its draw and its estimator put together.

:class:`NegativeCacheStep` is what the trainer calls instead of the plain step or the gradient cache when
``negative_cache`` is set; see the package docstring (:mod:`ragkit.retriever.negative_cache`) for the
estimator it optimises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..data import Batch
from ..distributed import gather_no_grad, gather_with_grad
from ..encoder import autocast
from ..gradcache import GradCache, split_inputs
from .estimator import cache_loss, staleness
from .sharded import distributed_draw, refresh_drawn
from .store import CacheDraw, NegativeCache


def append_rows(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack two tokenised batches ``(n1, L1)`` and ``(n2, L2)`` into ``(n1 + n2, max L)``.

    Rows are right-padded with 0 (no attention, no token), so each row encodes as it did alone; a key only
    one batch has (``token_type_ids``) is all zero in the other, which is what the encoder assumes without it.
    """
    width = max(first["input_ids"].size(1), second["input_ids"].size(1))

    def column(batch: dict[str, Tensor], name: str) -> Tensor:
        value = batch.get(name)
        if value is None:
            value = torch.zeros_like(batch["input_ids"])
        return torch.nn.functional.pad(value, (0, width - value.size(1)))

    return {name: torch.cat([column(first, name), column(second, name)]) for name in {**first, **second}}


class NegativeCacheStep:
    """A training step with cached negatives (Lindgren et al. 2021, :mod:`ragkit.retriever.negative_cache`).

    Besides the global batch, every query competes against a cache of passages encoded in earlier steps.
    One cached passage per query is drawn from the softmax over its stale scores and re-encoded with
    gradient, so the gradient equals that of the cross-entropy over batch + cache in expectation; the drawn
    passages get their fresh embeddings back, and the batch's passages enter the cache. Each process holds
    one shard of the cache; the draw is exact over the union of the shards. The logged loss is the
    cross-entropy over batch + cache (with the cache's stale scores). The in-batch candidates follow
    ``directions`` (DPR or GTE); the cache joins the query->passage pool.

    Per query, the cache entries that are its positives or its known answer-bearing passages
    (``batch.answer_rows``), and every passage of the global batch, are masked before the draw; the draw's
    logsumexp, which is the cache's share of the partition in the loss, is taken over the same allowed
    entries, so the draw and the partition cannot disagree. After each call :attr:`stats` holds the step's
    ``cache_size`` (entries over all shards when the draw was made) and ``cache_staleness`` (relative
    distance of the drawn items' cached embeddings to their re-encoding, over the global batch; None when
    no item was drawn).

    With ``chunk_size > 0`` the step runs through the gradient cache: the queries are encoded first (the
    draw needs them), the drawn items are appended to the batch's passages as extra rows, and all those rows
    are encoded chunk by chunk; the loss function splits them back into batch and drawn passages. Both
    paths call the same :meth:`loss` on the same rows, so they optimise the same estimator.
    """

    def __init__(self, model: nn.Module, capacity: int, dim: int, passage_max_length: int, temperature: float,
                 similarity: str, device: torch.device, seed: int, rank: int,
                 autocast_dtype: torch.dtype | None, scaler: "torch.amp.GradScaler | None",
                 directions: tuple[str, ...] = ("query_to_passage",), chunk_size: int = 0) -> None:
        self.model = model
        self.cache = NegativeCache(capacity, dim, passage_max_length, device=device)
        self.temperature = temperature
        self.similarity = similarity
        self.directions = directions
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.grad_cache = GradCache(model, self.loss, chunk_size, chunk_size, autocast_dtype, scaler) if chunk_size else None
        # Each process draws within its shard with its own noise; the choice of shard uses noise every
        # process shares (and no process uses for anything else), so all ranks pick the same shard.
        self.generator = torch.Generator(device=device).manual_seed(seed * 7919 + 1 + rank)
        self.shard_generator = torch.Generator(device=device).manual_seed(seed * 7919)
        self.stats: dict[str, float | int | None] = {}

    def __call__(self, batch: Batch, query_inputs: dict[str, Tensor], passage_inputs: dict[str, Tensor],
                 **labels: Tensor) -> Tensor:
        """Forward and backward of one step on this process's share of the batch; returns the detached loss.
        ``labels`` (``passage_rows`` / ``known_rows`` of :meth:`Batch.labels`) mask labelled positives in-batch."""
        self.stats = {"cache_size": int(gather_no_grad(torch.tensor([len(self.cache)], device=self.device)).sum())}
        if self.grad_cache is not None:
            return self._cached_step(batch, query_inputs, passage_inputs, labels)
        query = self._encode(query_inputs, "query")  # (b, D)
        passage = self._encode(passage_inputs, "passage")  # (b * G, D)
        draw = self.draw(batch, query)
        drawn = self._encode({k: v.to(self.device) for k, v in draw.inputs().items()}, "passage")  # (b * S, D)
        loss = self.loss(query, torch.cat([passage, drawn]), cache_lse=draw.lse, valid=draw.valid,
                         batch_rows=passage.size(0), **labels)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._update_cache(batch, draw, passage_inputs, passage.detach(), drawn.detach())
        return loss.detach()

    def _cached_step(self, batch: Batch, query_inputs: dict[str, Tensor], passage_inputs: dict[str, Tensor],
                     labels: dict[str, Tensor]) -> Tensor:
        grad_cache = self.grad_cache
        with grad_cache.step_region(query_inputs):
            query_chunks = split_inputs(query_inputs, grad_cache.query_chunk_size)
            query, query_first = grad_cache.forward_first(query_chunks, "query")  # (b, D)
            with torch.autocast(device_type=query.device.type, enabled=False):  # sampling in float32
                draw = self.draw(batch, query)
            rows = append_rows(passage_inputs, {k: v.to(self.device) for k, v in draw.inputs().items()})
            passage_chunks = split_inputs(rows, grad_cache.passage_chunk_size)
            passage, passage_first = grad_cache.forward_first(passage_chunks, "passage")  # (b * G + b * S, D)
            batch_rows = passage_inputs["input_ids"].size(0)
            loss, query_grad, passage_grad = grad_cache.build_cache(query, passage, cache_lse=draw.lse, valid=draw.valid,
                                                                    batch_rows=batch_rows, **labels)
            grad_cache.forward_backward(grad_cache.chunks(query_chunks, "query", query_first, query_grad),
                                        grad_cache.chunks(passage_chunks, "passage", passage_first, passage_grad))
        # The replayed forwards drew the same dropout masks, so these are the embeddings the loss saw.
        self._update_cache(batch, draw, passage_inputs, passage[:batch_rows], passage[batch_rows:])
        return loss

    def draw(self, batch: Batch, query: Tensor) -> CacheDraw:
        """One cached item per local query, exact over every process's shard; never one of the query's
        positives or known answer-bearing passages, nor a passage of the global batch."""
        excluded = batch.positive_rows
        if batch.answer_rows:
            excluded = [positives + answers for positives, answers in zip(batch.positive_rows, batch.answer_rows)]
        return distributed_draw(
            self.cache, query.detach(), generator=self.generator, shard_generator=self.shard_generator,
            temperature=self.temperature, similarity=self.similarity,
            excluded_ids=excluded, batch_ids=batch.passage_rows,
        )

    def loss(self, query: Tensor, rows: Tensor, *, cache_lse: Tensor, valid: Tensor, batch_rows: int,
             passage_rows: Tensor | None = None, known_rows: Tensor | None = None) -> Tensor:
        """The cache estimator over the global batch from this process's rows: ``query`` ``(b, D)``; ``rows``
        ``(b * G + b * S, D)``, the batch's passages then the drawn items. Gathers everything across processes."""
        passage, drawn = rows[:batch_rows], rows[batch_rows:]  # (b * G, D), (b * S, D)
        out = cache_loss(
            gather_with_grad(query), gather_with_grad(passage), gather_with_grad(drawn),
            gather_no_grad(cache_lse), gather_no_grad(valid),
            temperature=self.temperature, similarity=self.similarity, directions=self.directions,
            passage_rows=None if passage_rows is None else gather_no_grad(passage_rows),
            known_rows=None if known_rows is None else gather_no_grad(known_rows),
        )
        return out.loss

    def _update_cache(self, batch: Batch, draw: CacheDraw, passage_inputs: dict[str, Tensor], passage: Tensor,
                      drawn: Tensor) -> None:
        # Measured over the global batch so every process logs the same number.
        stale = staleness(gather_no_grad(draw.cached.flatten(0, 1)), gather_no_grad(drawn),
                          gather_no_grad(draw.valid.flatten()))
        self.stats["cache_staleness"] = None if bool(stale.isnan()) else float(stale)
        refresh_drawn(self.cache, draw, drawn)
        rows = torch.tensor(batch.passage_rows, dtype=torch.long)
        self.cache.add(passage, rows, passage_inputs["input_ids"], passage_inputs["attention_mask"],
                       passage_inputs.get("token_type_ids"))

    def _encode(self, inputs: dict[str, Tensor], tower: str) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.model(**inputs, tower=tower).float()  # (n, D)

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache.state_dict(), "generator": self.generator.get_state(),
                "shard_generator": self.shard_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state["cache"])
        self.generator.set_state(state["generator"])
        self.shard_generator.set_state(state["shard_generator"])
