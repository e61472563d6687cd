"""RAG marginals: against naive loops over passages and tokens, transformers' get_nll, and the gradient's closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ragkit.reader.marginalize import (
    gather_targets,
    next_token_log_probs,
    passage_log_probs,
    rag_loss,
    rag_sequence_log_likelihood,
    rag_token_log_likelihood,
    sequence_log_probs,
)


def rag_sequence_loss(*args, **kwargs):
    return rag_loss(*args[:4], "sequence", *args[4:], **kwargs)


def rag_token_loss(*args, **kwargs):
    return rag_loss(*args[:4], "token", *args[4:], **kwargs)

B, K, T, V = 4, 3, 5, 7
PAD = 1
LENGTHS = [5, 3, 2, 4]  # every row at least two tokens: see test_one_token_target_keeps_the_passage_prior


def random_case(seed: int, lengths=LENGTHS):
    generator = torch.Generator().manual_seed(seed)
    doc_scores = torch.randn(B, K, generator=generator, dtype=torch.float64) * 2
    token_log_probs = torch.log_softmax(torch.randn(B * K, T, V, generator=generator, dtype=torch.float64) * 2, dim=-1)
    targets = torch.randint(2, V, (B, T), generator=generator)  # never PAD inside an answer
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    targets = targets.masked_fill(~mask, PAD)
    return doc_scores, token_log_probs, targets, mask


def logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def naive_losses(doc_scores, token_log_probs, targets, mask, epsilon):
    """Per question: (RAG-Sequence loss, RAG-Token loss), one passage, token and vocabulary entry at a time."""
    sequence, token = [], []
    for b in range(B):
        total = sum(math.exp(s) for s in doc_scores[b].tolist())
        prior = [math.exp(s) / total for s in doc_scores[b].tolist()]
        positions = [t for t in range(T) if mask[b, t]]
        lp = lambda z, t, v: float(token_log_probs[b * K + z, t, v])  # noqa: E731

        p_y = sum(prior[z] * math.prod(math.exp(lp(z, t, int(targets[b, t]))) for t in positions) for z in range(K))
        # log p(z) joins every vocabulary entry of one scored position: V * log p(z)
        smooth_terms = [V * math.log(prior[z]) + sum(lp(z, t, v) for t in positions for v in range(V)) for z in range(K)]
        sequence.append((1 - epsilon) * -math.log(p_y) + epsilon / V * -logsumexp(smooth_terms))

        nll = -sum(math.log(sum(prior[z] * math.exp(lp(z, t, int(targets[b, t]))) for z in range(K))) for t in positions)
        smooth = -sum(math.log(sum(prior[z] * math.exp(lp(z, t, v)) for z in range(K))) for t in positions for v in range(V))
        token.append((1 - epsilon) * nll + epsilon / V * smooth)
    return torch.tensor(sequence, dtype=torch.float64), torch.tensor(token, dtype=torch.float64)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_equal_naive_loops(seed, epsilon):
    doc_scores, token_log_probs, targets, mask = random_case(seed)
    expected_sequence, expected_token = naive_losses(doc_scores, token_log_probs, targets, mask, epsilon)
    torch.testing.assert_close(rag_sequence_loss(doc_scores, token_log_probs, targets, mask, epsilon), expected_sequence)
    torch.testing.assert_close(rag_token_loss(doc_scores, token_log_probs, targets, mask, epsilon), expected_token)
    torch.testing.assert_close(
        rag_sequence_loss(doc_scores, token_log_probs, targets, mask, epsilon, reduce=True), expected_sequence.sum()
    )
    torch.testing.assert_close(rag_token_loss(doc_scores, token_log_probs, targets, mask, epsilon, reduce=True), expected_token.sum())


def test_padding_is_ignored_whatever_it_holds():
    doc_scores, token_log_probs, targets, mask = random_case(2)
    scrambled = token_log_probs.clone()
    rows = mask.repeat_interleave(K, dim=0)  # (B * K, T)
    scrambled[~rows] = float("-inf")
    garbage_targets = torch.where(mask, targets, torch.full_like(targets, V - 1))
    for loss in (rag_sequence_loss, rag_token_loss):
        torch.testing.assert_close(loss(doc_scores, scrambled, garbage_targets, mask), loss(doc_scores, token_log_probs, targets, mask))


def test_gathered_log_likelihoods_match_the_losses():
    doc_scores, token_log_probs, targets, mask = random_case(3)
    gathered = gather_targets(token_log_probs, targets, mask)  # (B, K, T)
    for b in range(B):
        for z in range(K):
            for t in range(LENGTHS[b]):
                assert gathered[b, z, t] == token_log_probs[b * K + z, t, targets[b, t]]
    torch.testing.assert_close(-rag_sequence_log_likelihood(doc_scores, gathered, mask), rag_sequence_loss(doc_scores, token_log_probs, targets, mask))
    torch.testing.assert_close(-rag_token_log_likelihood(doc_scores, gathered, mask), rag_token_loss(doc_scores, token_log_probs, targets, mask))


def test_one_passage_reduces_to_the_generator_likelihood():
    doc_scores, token_log_probs, targets, mask = random_case(4)
    one = doc_scores[:, :1]
    rows = token_log_probs.view(B, K, T, V)[:, 0]  # (B, T, V)
    gathered = gather_targets(rows, targets, mask)  # (B, 1, T)
    expected = sequence_log_probs(gathered, mask)[:, 0]
    torch.testing.assert_close(rag_sequence_log_likelihood(one, gathered, mask), expected)
    torch.testing.assert_close(rag_token_log_likelihood(one, gathered, mask), expected)


def test_next_token_distribution_is_the_per_step_marginal():
    doc_scores, token_log_probs, _, _ = random_case(5)
    step = token_log_probs.view(B, K, T, V)[:, :, 0]  # (B, K, V)
    marginal = next_token_log_probs(passage_log_probs(doc_scores), step)
    prior = torch.softmax(doc_scores, dim=-1)
    torch.testing.assert_close(marginal.exp(), (prior[:, :, None] * step.exp()).sum(1))
    torch.testing.assert_close(marginal.exp().sum(-1), torch.ones(B, dtype=torch.float64))


def _transformers_get_nll(cls, seq_logits, doc_scores, labels, epsilon, exclude_bos_score=False):
    """transformers' own loss, called on a stand-in for the model (it reads only config and marginalize)."""
    config = SimpleNamespace(n_docs=K, bos_token_id=None, generator=SimpleNamespace(pad_token_id=PAD, bos_token_id=0))
    model = SimpleNamespace(config=config)
    model.marginalize = lambda *args, **kwargs: cls.marginalize(model, *args, **kwargs)
    options = {"exclude_bos_score": exclude_bos_score} if exclude_bos_score else {}
    return cls.get_nll(model, seq_logits, doc_scores, labels, reduce_loss=False, epsilon=epsilon, n_docs=K, **options)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_losses_equal_transformers_get_nll(epsilon):
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    doc_scores, _, targets, mask = random_case(6)
    generator = torch.Generator().manual_seed(7)
    # transformers scores labels = [decoder start] + targets: logits at t predict labels[t + 1].
    seq_logits = torch.randn(B * K, T + 1, V, generator=generator, dtype=torch.float64) * 2
    labels = torch.cat([torch.full((B, 1), 2), targets], dim=1)
    token_log_probs = torch.log_softmax(seq_logits[:, :T], dim=-1)
    ours_sequence = rag_sequence_loss(doc_scores, token_log_probs, targets, mask, epsilon)
    ours_token = rag_token_loss(doc_scores, token_log_probs, targets, mask, epsilon)
    torch.testing.assert_close(ours_sequence, _transformers_get_nll(RagSequenceForGeneration, seq_logits, doc_scores, labels, epsilon))
    torch.testing.assert_close(ours_token, _transformers_get_nll(RagTokenForGeneration, seq_logits, doc_scores, labels, epsilon))
    if epsilon == 0.0:
        # exclude_bos_score: a first token equal to BOS is not scored; here, a target mask without it
        bos_targets = targets.clone()
        bos_targets[:, 0] = 0
        bos_labels = torch.cat([torch.full((B, 1), 2), bos_targets], dim=1)
        no_bos = mask.clone()
        no_bos[:, 0] = False
        theirs = _transformers_get_nll(RagSequenceForGeneration, seq_logits, doc_scores, bos_labels, 0.0, exclude_bos_score=True)
        torch.testing.assert_close(rag_sequence_loss(doc_scores, token_log_probs, bos_targets, no_bos), theirs)


def test_one_token_target_keeps_the_passage_prior():
    """transformers adds log p(z|x) on the second target position and loses it for one-token targets; we do not."""
    doc_scores, token_log_probs, targets, mask = random_case(8, lengths=[1, 1, 2, 3])
    expected_sequence, _ = naive_losses(doc_scores, token_log_probs, targets, mask, 0.0)
    torch.testing.assert_close(rag_sequence_loss(doc_scores, token_log_probs, targets, mask), expected_sequence)


def test_gradient_reaches_doc_scores_and_the_query_encoder():
    doc_scores, token_log_probs, targets, mask = random_case(9)
    gathered = gather_targets(token_log_probs, targets, mask)  # (B, K, T)
    scores = doc_scores.clone().requires_grad_(True)
    rag_sequence_loss(scores, token_log_probs, targets, mask, reduce=True).backward()
    # d(-log p(y|x)) / d score_z = p(z|x) - p(z|x,y): prior minus posterior
    prior = torch.softmax(doc_scores, dim=-1)
    joint = prior * sequence_log_probs(gathered, mask).exp()
    torch.testing.assert_close(scores.grad, prior - joint / joint.sum(-1, keepdim=True))

    scores = doc_scores.clone().requires_grad_(True)
    rag_token_loss(scores, token_log_probs, targets, mask, reduce=True).backward()
    per_token = prior[:, :, None] * gathered.exp()  # (B, K, T)
    posterior = (per_token / per_token.sum(1, keepdim=True)) * mask[:, None, :]
    torch.testing.assert_close(scores.grad, prior * mask.sum(-1, keepdim=True) - posterior.sum(-1))

    # doc scores = q . d with fixed passage vectors: the query encoder alone receives the gradient
    torch.manual_seed(0)
    query_encoder = torch.nn.Linear(6, 4).double()
    questions = torch.randn(B, 6, dtype=torch.float64)
    passages = torch.randn(B, K, 4, dtype=torch.float64)
    scores = torch.einsum("bd,bkd->bk", query_encoder(questions), passages)
    rag_sequence_loss(scores, token_log_probs, targets, mask, reduce=True).backward()
    assert query_encoder.weight.grad is not None and query_encoder.weight.grad.abs().sum() > 0
    assert not passages.requires_grad


def test_shape_errors_are_clear():
    doc_scores, token_log_probs, targets, mask = random_case(10)
    with pytest.raises(ValueError, match=r"\(B \* K, T, V\)"):
        rag_sequence_loss(doc_scores, token_log_probs[:-1], targets, mask)
    with pytest.raises(ValueError, match="epsilon"):
        rag_token_loss(doc_scores, token_log_probs, targets, mask, epsilon=1.0)
    with pytest.raises(ValueError, match="marginal='tokens' is not one of sequence, token"):
        rag_loss(doc_scores, token_log_probs, targets, mask, "tokens")
