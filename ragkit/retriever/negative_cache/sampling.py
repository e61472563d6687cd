"""Gumbel-Max sampling from a softmax, in one tensor or over shards that each report one candidate.

``argmax_j(l_j + G_j)`` with i.i.d. standard Gumbel noise ``G_j`` is distributed as ``softmax(l)``, so a
draw needs no normalisation; over shards, each shard draws within itself and reports its logsumexp, and a
second Gumbel-Max over those picks the shard (:func:`sharded_gumbel_max_sample`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

# Gumbel noise is drawn this many elements at a time at most, so many samples over a large cache do not
# materialise an (S, Q, N) tensor at once.
_NOISE_ELEMENTS = 1 << 22


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
