"""Gradient caching: a contrastive step over a large batch in the memory of a small chunk.

A contrastive loss couples every query with every passage of the batch, so the plain step keeps the
activations of the whole batch alive until the backward. The gradient cache (Gao et al., 2021, "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup", arXiv:2101.06983) splits the step in two:

1. ``split_inputs``: cut the query and passage batches into chunks;
2. ``forward_first``: encode every chunk without a graph, saving the random state before each chunk
   (the last chunk of each tower keeps its graph instead, see below);
3. ``build_cache``: compute the loss on the concatenated representations, made leaf tensors, and
   backward it only as far as the representations: ``d loss / d representation`` is the cache;
4. ``forward_backward``: for each chunk, replay its random state (same dropout masks), encode it again
   with the graph and backward the surrogate ``(representation * cached gradient).sum()``, whose gradient
   with respect to the weights is exactly that chunk's share of ``d loss / d weights``.

The parameter gradients equal those of the plain step over the whole batch; peak memory is that of one
query chunk and one passage chunk plus the representations, at the price of a second forward.

The second forward is skipped for the last chunk of each tower: the first pass encodes it *with* its
graph (the step's peak already holds one query and one passage chunk with their graphs), and its
surrogate is backwarded from that graph before the other chunks are replayed. A step therefore costs one
forward of the batch plus a second forward of all but one chunk per tower; with a single chunk per tower
the cached step does exactly the work of the plain step. Not under DDP, whose one synchronised backward
must come last (``keep_last_graph`` is then off).

Mixed precision: the model runs under ``torch.autocast(autocast_dtype)`` in both forwards; the loss and the
surrogate are computed in float32 on ``representation.float()``. The whole step is one autocast region
(``step_region``), so the low-precision copies of the weights autocast makes are cast once per step and
reused by every chunk's forwards instead of once per chunk and pass (with chunks of 16 at batch 512 that
is 128 casts of every weight matrix). This needs a PyTorch whose autocast cache keeps the gradient history
of a cast first made under ``no_grad`` (pytorch#112583, fixed in late 2025); on older versions, detected
once by a probe, and under DDP (whose last backward joins two chunks, whose gradients would meet in the
shared low-precision cast), each chunk gets its own region. Losses and backwards run with autocast off,
since the CPU autograd engine applies the caller's autocast state to backward ops.

With an fp16 ``GradScaler`` the loss is scaled before its backward, so the cache holds
``scale * d loss / d representation`` and the surrogate carries that scale into the weight gradients,
exactly as ``scaler.scale(loss).backward()`` does in the plain step; the caller then unscales, steps and
updates the scaler as usual (an overflow shows up as inf/nan in the weight gradients and the scaler
skips the step).

Under ``DistributedDataParallel`` the loss function gathers the representations of every rank itself
(``ragkit.retriever.distributed.global_loss``), so the cache already holds gradients of the global loss.
Gradients are synchronised once per step: every re-forward runs under ``model.no_sync()`` except the last
one, which encodes the last query chunk *and* the last passage chunk and backwards their surrogates together.
That final synchronised backward therefore reaches the weights of both towers, so a bi-encoder with separate
query and passage towers in one DDP module needs no ``find_unused_parameters``; it must in fact be off (the
default): with it on, DDP decides which weights are unused from the last forward alone (the passage tower)
and then fails when the query tower's gradients arrive in the same backward. The plain step, which also
runs both towers before one backward, has the same constraint.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .rng import RngState

if TYPE_CHECKING:
    from torch.amp import GradScaler

Tower = Literal["query", "passage"]
Batch = dict[str, Tensor]


class Chunk(NamedTuple):
    """One slice of a tower's batch, the random state its first forward started from, and its cached gradient."""

    inputs: Batch
    tower: Tower
    rng: RngState | None
    cached_grad: Tensor  # (b, D)
    graph: Tensor | None = None  # (b, D) the first forward's output with its graph, when kept: no replay


def split_inputs(batch: Batch, chunk_size: int) -> list[Batch]:
    """Cut every tensor of ``batch`` (same leading size) into chunks of ``chunk_size`` rows; the last may be short."""
    sizes = {name: value.size(0) for name, value in batch.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"batch tensors must share one non-empty leading dimension, got sizes {sizes}")
    names = list(batch)
    pieces = [batch[name].split(chunk_size, dim=0) for name in names]
    return [dict(zip(names, chunk)) for chunk in zip(*pieces)]


def _autocast(batch: Batch, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    device_type = next(iter(batch.values())).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


@functools.lru_cache(maxsize=None)
def autocast_cache_survives_no_grad() -> bool:
    """Whether a weight cast that autocast cached under ``no_grad`` still leads back to the weight when it
    is reused with gradients on (probed once on a 2x2 weight, drawing nothing from the random generators;
    see the module docstring)."""
    weight = torch.ones(2, 2, requires_grad=True)
    x = torch.ones(1, 2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            torch.nn.functional.linear(x, weight)
        out = torch.nn.functional.linear(x, weight)
    return out.grad_fn is not None


def _encode(model: nn.Module, batch: Batch, tower: Tower, autocast_dtype: torch.dtype | None) -> Tensor:
    with _autocast(batch, autocast_dtype):
        return model(**batch, tower=tower)  # (b, D)


def check_ddp_wrapping(model: nn.Module) -> None:
    """Refuse a DDP wrapper that cannot take two towers' forwards before one backward (see module docstring)."""
    if (isinstance(model, nn.parallel.DistributedDataParallel) and model.find_unused_parameters
            and not getattr(model.module, "shared", True)):
        raise ValueError(
            "separate query and passage towers under DistributedDataParallel need find_unused_parameters=False "
            "(every weight gets a gradient in each step)"
        )


def _backward(loss: Tensor, scaler: "GradScaler | None") -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


class GradCache:
    """One cached contrastive step: exact full-batch gradients, accumulated into the model's ``.grad``.

    Args:
        model: a ``BiEncoder`` (possibly wrapped in ``DistributedDataParallel``), called as
            ``model(input_ids=..., attention_mask=..., tower="query" | "passage")`` and returning ``(b, D)``.
        loss_fn: ``(query (B, D), passage (B * G, D), **loss_kwargs) -> scalar``, e.g. a ``ContrastiveLoss``;
            the very function the plain step uses, so both paths optimise the same objective.
        query_chunk_size, passage_chunk_size: rows encoded at once; memory grows with these, not with the batch.
        autocast_dtype: ``torch.bfloat16`` (CPU or CUDA) or ``torch.float16`` (CUDA, with ``scaler``) to run the
            encoder under autocast; ``None`` for full precision.
        scaler: an fp16 ``torch.amp.GradScaler``; the loss is scaled before its backward (see module docstring).
        keep_last_graph: encode the last chunk of each tower with its graph in the first pass instead of
            replaying it (same gradients, one chunk's forward less per tower); ignored under DDP.

    Under DDP every rank must pass the same local batch size, so that all ranks run the same sequence of
    collectives.

    Example::

        cache = GradCache(model, ContrastiveLoss(temperature=0.05), query_chunk_size=32, passage_chunk_size=32)
        loss = cache(query={"input_ids": q_ids, "attention_mask": q_mask},
                     passage={"input_ids": p_ids, "attention_mask": p_mask})
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        query_chunk_size: int,
        passage_chunk_size: int,
        autocast_dtype: torch.dtype | None = None,
        scaler: "GradScaler | None" = None,
        keep_last_graph: bool = True,
    ) -> None:
        if query_chunk_size < 1 or passage_chunk_size < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {query_chunk_size} and {passage_chunk_size}")
        check_ddp_wrapping(model)
        self.model = model
        self.loss_fn = loss_fn
        self.query_chunk_size = query_chunk_size
        self.passage_chunk_size = passage_chunk_size
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.keep_last_graph = keep_last_graph and not self.ddp

    def __call__(self, query: Batch, passage: Batch, **loss_kwargs) -> Tensor:
        """Run the cached step on a query batch (B rows) and its grouped passages (B * G rows).

        Extra keyword arguments (e.g. guide-model representations) go to ``loss_fn`` unchanged.
        Returns the detached loss.
        """
        query_chunks = split_inputs(query, self.query_chunk_size)
        passage_chunks = split_inputs(passage, self.passage_chunk_size)
        with self.step_region(query):
            query_reps, query_first = self.forward_first(query_chunks, "query")  # (B, D)
            passage_reps, passage_first = self.forward_first(passage_chunks, "passage")  # (B * G, D)
            loss, query_cache, passage_cache = self.build_cache(query_reps, passage_reps, **loss_kwargs)
            self.forward_backward(self.chunks(query_chunks, "query", query_first, query_cache),
                                  self.chunks(passage_chunks, "passage", passage_first, passage_cache))
        return loss

    def step_region(self, batch: Batch):
        """One autocast region around a whole step, so weight casts are made once (see module docstring);
        a no-op in full precision, under DDP, or where the probe says the autocast cache is unsafe."""
        if self.autocast_dtype is None or self.ddp or not autocast_cache_survives_no_grad():
            return nullcontext()
        return _autocast(batch, self.autocast_dtype)

    def forward_first(self, chunks: list[Batch], tower: Tower) -> tuple[Tensor, list[RngState | Tensor]]:
        """Encode every chunk; return the concatenated float32 representations (detached) and, per chunk,
        what its second pass needs: the random state it started from, or its output with the graph (the
        last chunk, when ``keep_last_graph``)."""
        reps, first = [], []
        for i, chunk in enumerate(chunks):
            if self.keep_last_graph and i == len(chunks) - 1:
                graph = _encode(self.model, chunk, tower, self.autocast_dtype)  # (b, D)
                reps.append(graph.detach().float())
                first.append(graph)
                continue
            first.append(RngState())
            with torch.no_grad():
                reps.append(_encode(self.model, chunk, tower, self.autocast_dtype).float())  # (b, D)
        return torch.cat(reps), first

    def chunks(self, inputs: list[Batch], tower: Tower, first: list[RngState | Tensor], cache: Tensor) -> list[Chunk]:
        """Pair each chunk's inputs and first-pass record with its rows of the cached gradient."""
        grads = cache.split(self.query_chunk_size if tower == "query" else self.passage_chunk_size)
        return [Chunk(x, tower, None, g, state) if isinstance(state, Tensor) else Chunk(x, tower, state, g)
                for x, state, g in zip(inputs, first, grads)]

    def build_cache(self, query_reps: Tensor, passage_reps: Tensor, **loss_kwargs) -> tuple[Tensor, Tensor, Tensor]:
        """Loss on the whole batch of representations and its gradient with respect to each of them."""
        query_leaf = query_reps.detach().requires_grad_()  # (B, D)
        passage_leaf = passage_reps.detach().requires_grad_()  # (B * G, D)
        # In float32 inside a step region too: the CPU autograd engine runs backward ops under the caller's
        # autocast state, which would round the loss's backward matmuls to the autocast dtype.
        with torch.autocast(device_type=query_leaf.device.type, enabled=False):
            loss = self.loss_fn(query_leaf, passage_leaf, **loss_kwargs)
            _backward(loss, self.scaler)
        # A representation the loss ignores still gets a (zero) surrogate, so its tower's weights join the
        # synchronised backward under DDP.
        query_cache = query_leaf.grad if query_leaf.grad is not None else torch.zeros_like(query_leaf)
        passage_cache = passage_leaf.grad if passage_leaf.grad is not None else torch.zeros_like(passage_leaf)
        return loss.detach(), query_cache, passage_cache

    def forward_backward(self, query_chunks: list[Chunk], passage_chunks: list[Chunk]) -> None:
        """Backward every chunk's surrogate, from the graph its first pass kept or re-encoded under its saved
        random state.

        In one process every chunk backwards alone, kept ones first (which frees their activations), so no
        two chunks' gradients ever meet in an autocast-dtype cast of a shared weight. Under DDP all but the
        last chunk of each tower accumulate gradients locally; the two last chunks share the one
        synchronised backward (see module docstring).
        """
        if not self.ddp:
            ordered = sorted(query_chunks + passage_chunks, key=lambda chunk: chunk.graph is None)
            for chunk in ordered:
                self._surrogate_backward([chunk])
            return
        with self.model.no_sync():
            for chunk in query_chunks[:-1] + passage_chunks[:-1]:
                self._surrogate_backward([chunk])
        self._surrogate_backward([query_chunks[-1], passage_chunks[-1]])

    def _surrogate_backward(self, chunks: list[Chunk]) -> None:
        surrogate = 0.0
        for chunk in chunks:
            if chunk.graph is not None:
                reps = chunk.graph  # (b, D)
            else:
                with chunk.rng:
                    reps = _encode(self.model, chunk.inputs, chunk.tower, self.autocast_dtype)  # (b, D)
            # d surrogate / d reps == cached gradient, so backprop from here hands the weights this chunk's
            # share of d loss / d weights; in fp32 so the cached gradient is not rounded to the autocast dtype.
            surrogate = surrogate + (reps.float() * chunk.cached_grad).sum()
        with torch.autocast(device_type=chunk.cached_grad.device.type, enabled=False):  # as outside a step region
            surrogate.backward()


def full_batch_step(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    query: Batch,
    passage: Batch,
    autocast_dtype: torch.dtype | None = None,
    scaler: "GradScaler | None" = None,
    **loss_kwargs,
) -> Tensor:
    """The plain step with the same conventions as ``GradCache``: encode everything with the graph, loss in
    float32, backward (scaled when ``scaler`` is given). Gradients accumulate into ``.grad``; returns the
    detached loss."""
    check_ddp_wrapping(model)
    query_reps = _encode(model, query, "query", autocast_dtype).float()  # (B, D)
    passage_reps = _encode(model, passage, "passage", autocast_dtype).float()  # (B * G, D)
    loss = loss_fn(query_reps, passage_reps, **loss_kwargs)
    _backward(loss, scaler)
    return loss.detach()
