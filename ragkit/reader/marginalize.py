"""RAG marginals over retrieved passages, in log space: pure functions of tensors.

Lewis et al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks" (arXiv:2005.11401).
A question ``x`` retrieves ``K`` passages ``z`` with scores ``q.d``; ``log p(z|x)`` is their log-softmax,
the only place the query encoder's gradient enters (the passage vectors are fixed). Then::

    RAG-Sequence   log p(y|x) = logsumexp_z [ log p(z|x) + sum_t log p(y_t | x, z, y_<t) ]
    RAG-Token      log p(y|x) = sum_t logsumexp_z [ log p(z|x) + log p(y_t | x, z, y_<t) ]

Shapes: ``B`` questions, ``K`` passages each, ``T`` target positions, ``V`` vocabulary entries. Row
``b * K + k`` of a ``(B * K, ...)`` tensor belongs to question ``b`` and its ``k``-th passage. Position ``t``
of the token log-probs is the distribution the target token ``targets[:, t]`` is drawn from (the caller
aligns them: decoder inputs shifted right for BART, the answer positions after the prompt for causal
LMs). Positions where ``target_mask`` is False (padding, or a token deliberately not scored) count for
nothing: the target log-probs there may hold anything, even ``-inf``.

Label smoothing follows transformers' ``RagSequenceForGeneration.get_nll`` and
``RagTokenForGeneration.get_nll``: ``loss = (1 - eps) * nll + (eps / V) * smooth``, where ``smooth`` is
the negative log-likelihood with every target log-prob replaced by the sum of the log-probs over the
vocabulary. For RAG-Token that sum is taken over the marginal distribution of each position. For
RAG-Sequence it is taken per passage and then marginalised like the likelihood; transformers adds
``log p(z|x)`` to every vocabulary entry of one target position (making it the joint ``log p(z, y_t|x)``),
so the sum carries ``V * log p(z|x)``, and so does ours. Two differences, both at the edges: transformers
puts ``log p(z|x)`` on the second position and loses it when that position is padding (a one-token
target), where ours keeps it; and its ``exclude_bos_score`` leaves the first token out of the likelihood
but not out of the smoothing term, where ours leaves masked positions out of both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def passage_log_probs(doc_scores: Tensor) -> Tensor:
    """``log p(z|x)``: the log-softmax of each question's passage scores. ``(B, K) -> (B, K)``, float32 or wider."""
    return torch.log_softmax(doc_scores.to(torch.promote_types(doc_scores.dtype, torch.float32)), dim=-1)


def per_passage(rows: Tensor, num_passages: int) -> Tensor:
    """``(B * K, ...) -> (B, K, ...)``: rows grouped by question."""
    if rows.shape[0] % num_passages:
        raise ValueError(f"{rows.shape[0]} rows is not a multiple of {num_passages} passages")
    return rows.view(rows.shape[0] // num_passages, num_passages, *rows.shape[1:])


def gather_targets(token_log_probs: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
    """Each position's log-prob of its target token: ``(B * K, T, V)`` and ``(B, T)`` -> ``(B, K, T)``.

    Masked positions are gathered at token 0 (any id there is ignored downstream).
    """
    batch, length = targets.shape
    log_probs = per_passage(token_log_probs, token_log_probs.shape[0] // batch)  # (B, K, T, V)
    index = targets.masked_fill(~target_mask, 0)[:, None, :, None].expand(-1, log_probs.shape[1], length, 1)  # (B, K, T, 1)
    return log_probs.gather(-1, index).squeeze(-1)  # (B, K, T)


def sequence_log_probs(target_log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """``log p(y|x,z)`` per passage: the target log-probs summed over the scored positions. ``(B, K, T) -> (B, K)``."""
    return target_log_probs.masked_fill(~target_mask[:, None, :], 0.0).sum(-1)


def rag_sequence_log_likelihood(doc_scores: Tensor, target_log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """RAG-Sequence ``log p(y|x) = logsumexp_z [log p(z|x) + log p(y|x,z)]``. ``(B, K), (B, K, T), (B, T) -> (B,)``."""
    joint = passage_log_probs(doc_scores) + sequence_log_probs(target_log_probs, target_mask)  # (B, K)
    return torch.logsumexp(joint, dim=1)  # (B,)


def rag_token_log_likelihood(doc_scores: Tensor, target_log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """RAG-Token ``log p(y|x) = sum_t logsumexp_z [log p(z|x) + log p(y_t|x,z,y_<t)]``. ``(B, K), (B, K, T), (B, T) -> (B,)``."""
    joint = passage_log_probs(doc_scores)[:, :, None] + target_log_probs  # (B, K, T)
    per_token = torch.logsumexp(joint, dim=1)  # (B, T)
    return per_token.masked_fill(~target_mask, 0.0).sum(-1)  # (B,)


def next_token_log_probs(passage_log_prob: Tensor, step_log_probs: Tensor) -> Tensor:
    """RAG-Token's next-token distribution ``logsumexp_z [log p(z|x) + log p(v|x,z,y_<t)]``.

    ``passage_log_prob`` ``(N, K)`` (``log p(z|x)`` of each hypothesis' question), ``step_log_probs``
    ``(N, K, V)`` -> ``(N, V)``.
    """
    return torch.logsumexp(passage_log_prob[:, :, None] + step_log_probs, dim=1)  # (N, V)


MARGINALS: tuple[str, ...] = ("sequence", "token")


def rag_loss(
    doc_scores: Tensor,
    token_log_probs: Tensor,
    targets: Tensor,
    target_mask: Tensor,
    marginal: Literal["sequence", "token"],
    epsilon: float = 0.0,
    reduce: bool = False,
) -> Tensor:
    """RAG-Sequence or RAG-Token negative log-likelihood, label-smoothed with ``epsilon`` (module docstring).

    ``doc_scores`` ``(B, K)``, ``token_log_probs`` ``(B * K, T, V)``, ``targets`` / ``target_mask``
    ``(B, T)`` (bool) -> ``(B,)``, or their sum with ``reduce``.
    """
    batch, passages = doc_scores.shape
    if marginal not in MARGINALS:
        raise ValueError(f"marginal={marginal!r} is not one of {', '.join(MARGINALS)}")
    if token_log_probs.dim() != 3 or token_log_probs.shape[0] != batch * passages:
        raise ValueError(f"token log-probs {tuple(token_log_probs.shape)} must be (B * K, T, V) = ({batch * passages}, T, V)")
    if targets.shape != (batch, token_log_probs.shape[1]) or target_mask.shape != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(target_mask.shape)} must be (B, T) = ({batch}, {token_log_probs.shape[1]})")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1)")
    log_likelihood = rag_sequence_log_likelihood if marginal == "sequence" else rag_token_log_likelihood
    loss = -log_likelihood(doc_scores, gather_targets(token_log_probs, targets, target_mask), target_mask)  # (B,)
    if epsilon > 0.0:
        smoothing = _sequence_smoothing if marginal == "sequence" else _token_smoothing
        vocab_size = token_log_probs.shape[-1]
        loss = (1.0 - epsilon) * loss + (epsilon / vocab_size) * smoothing(doc_scores, token_log_probs, target_mask)
    return loss.sum() if reduce else loss


def _sequence_smoothing(doc_scores: Tensor, token_log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """RAG-Sequence's smoothing term: the log-likelihood of "every vocabulary entry" per passage, marginalised. ``-> (B,)``."""
    vocab_size = token_log_probs.shape[-1]
    vocab_sums = per_passage(token_log_probs.sum(-1), doc_scores.shape[1])  # (B, K, T)
    scored = target_mask.any(dim=1, keepdim=True)  # (B, 1): log p(z|x) joins one scored position
    prior = torch.where(scored, vocab_size * passage_log_probs(doc_scores), 0.0)  # (B, K)
    return -torch.logsumexp(prior + sequence_log_probs(vocab_sums, target_mask), dim=1)  # (B,)


def _token_smoothing(doc_scores: Tensor, token_log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """RAG-Token's smoothing term: the marginal log-probs of all vocabulary entries, summed. ``-> (B,)``."""
    log_probs = per_passage(token_log_probs, doc_scores.shape[1])  # (B, K, T, V)
    marginal = torch.logsumexp(passage_log_probs(doc_scores)[:, :, None, None] + log_probs, dim=1)  # (B, T, V)
    return -marginal.sum(-1).masked_fill(~target_mask, 0.0).sum(-1)  # (B,)
