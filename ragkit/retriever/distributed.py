"""Several processes, one global contrastive batch.

Each rank encodes its slice of the global batch, all-gathers the representations *with gradient* and
computes the same loss over the whole global batch, so every query scores every passage of every rank.
The slices are taken so that the gathered rows come back in single-process order (``shard_batch``): rank
``r`` holds queries ``r*b .. (r+1)*b - 1`` and their passages, so query ``i``'s positive stays at row
``i * G`` of the gathered passages and the labels line up.

Gradient scaling, checked by the two-process test against one process on the whole batch: the backward of
the all-gather sums the incoming gradients over ranks, so each rank's representation gradient is
``world_size`` times its share of ``d global loss / d representation`` (every rank back-propagates the same
loss); ``DistributedDataParallel`` then averages the weight gradients over ranks, and the two factors cancel:
every rank ends with exactly the global-batch gradient. No extra rescaling is applied anywhere.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import RagkitError

T = TypeVar("T")  # a tensor, a sequence, or a dict of either


@dataclass
class DistInfo:
    """Where this process sits: its global rank, the number of processes, its rank on this host, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RagkitError(f"environment variable {name}={value!r} is not an integer (launch with torchrun)") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Without those variables (or with WORLD_SIZE=1) this is a single process and no group is created.
    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. Calling it again once the
    group exists returns the same information.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size == 1 and not dist.is_initialized():
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device)
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RagkitError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set (launch with torchrun --nproc-per-node N)"
            )
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                rank=_env_int("RANK", 0), world_size=world_size)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(t: Tensor) -> Tensor:
    """``(b, D)`` on every rank -> ``(b * world, D)`` in rank order, differentiable.

    Uses the functional collectives' ``all_gather_single``, whose backward is a sum-reduce-scatter of the
    gradients of every rank (see module docstring for the scaling). ``torch.distributed.nn.functional.all_gather``
    backpropagates the same gradients on gloo too, but it is deprecated in torch 2.13 and, after its
    all-to-all backward, 3 of 5 two-process gloo runs aborted at exit ("terminate called without an active
    exception"), against none of 5 with the functional version; it serves only a torch that lacks the
    functional one. Every rank must pass the same ``b``.
    """
    if not is_distributed():
        return t
    from torch.distributed import _functional_collectives as collectives

    if hasattr(collectives, "all_gather_single_autograd"):
        gathered = collectives.all_gather_single_autograd(t.contiguous(), 0, dist.group.WORLD)
        return collectives.wait_tensor(gathered)  # (b * world, D)
    import torch.distributed.nn.functional as distributed_functional

    return torch.cat(distributed_functional.all_gather(t.contiguous()), dim=0)  # (b * world, D)


def gather_no_grad(t: Tensor) -> Tensor:
    """``(b, D)`` on every rank -> ``(b * world, D)`` in rank order, detached (no gradient flows back)."""
    if not is_distributed():
        return t.detach()
    t = t.detach().contiguous()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return torch.cat(gathered, dim=0)  # (b * world, D)


def global_loss(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap ``loss_fn(query, passage, **kw)`` so it runs on the representations of every rank, gathered with
    gradient (and on gathered guide representations, which carry none). Single process: ``loss_fn`` itself,
    so call this after ``init_distributed``."""

    def gathered_loss(query: Tensor, passage: Tensor, **loss_kwargs) -> Tensor:
        extra = {name: gather_no_grad(value) if isinstance(value, Tensor) else value for name, value in loss_kwargs.items()}
        return loss_fn(gather_with_grad(query), gather_with_grad(passage), **extra)

    return gathered_loss if is_distributed() else loss_fn


def shard_bounds(global_size: int, rank: int, world_size: int) -> slice:
    """Rows ``rank * b .. (rank + 1) * b - 1`` of a global batch of ``global_size = b * world_size`` rows."""
    if global_size % world_size:
        raise RagkitError(
            f"global batch of {global_size} does not split evenly over {world_size} processes "
            f"(set the batch size to a multiple of {world_size})"
        )
    local = global_size // world_size
    return slice(rank * local, (rank + 1) * local)


def shard_batch(batch: T, rank: int, world_size: int) -> T:
    """This rank's contiguous share of a global batch (a tensor, a list, or a dict of either), so that the
    gathered representations come back in single-process order.

    Shard the queries ``(B, ...)`` and the grouped passages ``(B * G, ...)`` alike: rank ``r`` then holds
    queries ``r*b .. (r+1)*b - 1`` and exactly their ``G`` passages each.
    """
    if isinstance(batch, dict):
        return {name: shard_batch(value, rank, world_size) for name, value in batch.items()}
    return batch[shard_bounds(len(batch), rank, world_size)]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group if one was joined.

    Drop every ``DistributedDataParallel`` wrapper before calling this. A DDP reducer that outlives the group
    holds the last reference to it, and freeing the reducer then destroys a gloo group while holding the GIL,
    which can deadlock against gloo's worker threads (observed with torch 2.13). Unreachable wrappers are
    collected here first so that the group is destroyed by ``destroy_process_group``, which releases the GIL.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class _MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main_process_logger(name: str) -> logging.Logger:
    """A logger whose records are dropped on every rank but 0, so a multi-process run logs each line once."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _MainRankOnly) for f in logger.filters):
        logger.addFilter(_MainRankOnly())
    return logger
