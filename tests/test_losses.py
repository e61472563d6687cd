"""ContrastiveLoss against a naive per-query loop (values and gradients) and against sentence-transformers."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ragkit.errors import RagkitError
from ragkit.retriever.losses import DIRECTIONS, ContrastiveLoss, candidate_masks, guide_threshold

Q2P, Q2Q, P2Q, P2P = DIRECTIONS
DIRECTION_SETS = [(Q2P, *extra) for r in range(4) for extra in itertools.combinations((Q2Q, P2Q, P2P), r)]


def naive_loss(query, passage, temperature, similarity, directions, guide_query=None, guide_passage=None, strategy=None, margin=0.0,
               rows=None, known=None):
    """The loss written out one query and one candidate at a time. ``rows[k]`` names passage ``k`` and
    ``known[i]`` the set of names labelled relevant to query ``i`` (both optional)."""
    batch, group = query.size(0), passage.size(0) // query.size(0)

    def score(a, b):
        if similarity == "cos":
            return (a @ b) / (a.norm() * b.norm())
        return a @ b

    def guide_cos(a, b):
        return float((a @ b) / (a.norm() * b.norm()))

    # Without a guide nothing is dropped; the placeholders only keep the loop below uniform.
    gq, gp = (guide_query, guide_passage) if strategy is not None else (query.detach(), passage.detach())
    losses = []
    for i in range(batch):
        q_i, d_i = query[i], passage[i * group]
        threshold = None
        if strategy is not None:
            g_pos = guide_cos(gq[i], gp[i * group])
            threshold = {"none": g_pos, "absolute": g_pos - margin, "relative": g_pos - abs(g_pos) * margin}[strategy]

        def dropped(anchor_guide, candidate_guide):
            return threshold is not None and guide_cos(anchor_guide, candidate_guide) > threshold

        def labelled(query_index, passage_index):
            return known is not None and rows[passage_index] in known[query_index]

        terms = []
        for k in range(batch * group):
            if k == i * group or not (dropped(gq[i], gp[k]) or labelled(i, k)):
                terms.append(score(q_i, passage[k]))
        if Q2Q in directions:
            for j in range(batch):
                if j != i and not dropped(gq[i], gq[j]):
                    terms.append(score(q_i, query[j]))
        if P2Q in directions:
            for j in range(batch):
                if j != i and not (dropped(gp[i * group], gq[j]) or labelled(j, i * group)):
                    terms.append(score(d_i, query[j]))
        if P2P in directions:
            for k in range(batch * group):
                if k // group != i and not (dropped(gp[i * group], gp[k]) or labelled(i, k)):
                    terms.append(score(d_i, passage[k]))
        numerator = torch.exp(score(q_i, d_i) / temperature)
        denominator = sum(torch.exp(t / temperature) for t in terms)
        losses.append(-torch.log(numerator / denominator))
    return torch.stack(losses).mean()


def embeddings(batch=4, group=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64).requires_grad_()
    passage = torch.randn(batch * group, dim, generator=generator, dtype=torch.float64).requires_grad_()
    return query, passage


def sign_guide(batch=4, group=3, seed=1):
    """Guide vectors in {-1, +1}^4: every cosine is a multiple of 1/4 exactly, so thresholds tie exactly."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch * (group + 1), 4), generator=generator).double() * 2 - 1
    guide_query, guide_passage = signs[:batch], signs[batch:]
    # g_pos of query 0 is -1/2 and of query 1 is +1/2, so the margins meet both signs.
    guide_passage[0] = -guide_query[0]
    guide_passage[0, 0] *= -1
    guide_passage[group] = guide_query[1]
    guide_passage[group, 0] *= -1
    return guide_query, guide_passage


def assert_same_value_and_grad(loss_fn, naive_kwargs, query, passage, guide=(None, None)):
    vectorised = loss_fn(query, passage, *guide)
    grads = torch.autograd.grad(vectorised, (query, passage))
    reference = naive_loss(query, passage, **naive_kwargs)
    naive_grads = torch.autograd.grad(reference, (query, passage))
    assert torch.isfinite(vectorised)
    torch.testing.assert_close(vectorised, reference, rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads, naive_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("similarity,temperature", [("dot", 1.0), ("dot", 0.2), ("cos", 0.05)])
@pytest.mark.parametrize("group", [1, 3])
def test_dpr_matches_naive_loop(similarity, temperature, group):
    query, passage = embeddings(group=group)
    loss_fn = ContrastiveLoss(temperature=temperature, similarity=similarity)
    naive = dict(temperature=temperature, similarity=similarity, directions=(Q2P,))
    assert_same_value_and_grad(loss_fn, naive, query, passage)


def test_dpr_equals_cross_entropy_over_all_passages():
    query, passage = embeddings(batch=5, group=4)
    logits = query @ passage.T  # (5, 20)
    expected = F.cross_entropy(logits, torch.arange(5) * 4)
    torch.testing.assert_close(ContrastiveLoss(temperature=1.0)(query, passage), expected)


@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=lambda d: "+".join(x.replace("_to_", "2") for x in d))
@pytest.mark.parametrize("group", [1, 3])
def test_gte_direction_subsets_match_naive_loop(directions, group):
    query, passage = embeddings(group=group, seed=2)
    loss_fn = ContrastiveLoss(temperature=0.05, similarity="cos", directions=directions)
    naive = dict(temperature=0.05, similarity="cos", directions=directions)
    assert_same_value_and_grad(loss_fn, naive, query, passage)


def test_direction_order_does_not_matter():
    query, passage = embeddings()
    a = ContrastiveLoss(directions=(Q2P, P2P, Q2Q))(query, passage)
    b = ContrastiveLoss(directions=(Q2Q, Q2P, P2P))(query, passage)
    torch.testing.assert_close(a, b)


GUIDE_CASES = [("none", 0.0), ("absolute", 0.0), ("absolute", 0.5), ("relative", 0.5), ("relative", 1.0)]


@pytest.mark.parametrize("strategy,margin", GUIDE_CASES)
@pytest.mark.parametrize("directions", [(Q2P,), DIRECTIONS], ids=["q2p", "all"])
def test_gist_with_exact_ties_matches_naive_loop(strategy, margin, directions):
    query, passage = embeddings(seed=3)
    guide_query, guide_passage = sign_guide()
    g_pos = F.cosine_similarity(guide_query, guide_passage[::3])
    assert (g_pos < 0).any() and (g_pos > 0).any()
    loss_fn = ContrastiveLoss(0.05, "cos", directions, guide_margin_strategy=strategy, guide_margin=margin)
    naive = dict(
        temperature=0.05, similarity="cos", directions=directions,
        guide_query=guide_query, guide_passage=guide_passage, strategy=strategy, margin=margin,
    )
    assert_same_value_and_grad(loss_fn, naive, query, passage, (guide_query, guide_passage))


@pytest.mark.parametrize("strategy,margin", [("none", 0.0), ("absolute", 0.1), ("relative", 0.3)])
def test_gist_with_random_guide_and_dot_scores_matches_naive_loop(strategy, margin):
    query, passage = embeddings(seed=4)
    guide_query, guide_passage = (t.detach() for t in embeddings(seed=5, dim=6))
    # Query 1's guide positive points away from it: a negative g_pos.
    guide_passage[3] = -guide_query[1] + 0.1 * guide_passage[3]
    loss_fn = ContrastiveLoss(0.5, "dot", DIRECTIONS, guide_margin_strategy=strategy, guide_margin=margin)
    naive = dict(
        temperature=0.5, similarity="dot", directions=DIRECTIONS,
        guide_query=guide_query, guide_passage=guide_passage, strategy=strategy, margin=margin,
    )
    assert_same_value_and_grad(loss_fn, naive, query, passage, (guide_query, guide_passage))


def shared_passage_labels(batch=4, group=3):
    """Corpus rows of a batch where questions share passages: query 1's positive is a copy of query 0's,
    query 2's hard negative is query 3's positive, and query 3 also knows query 0's positive (an answer
    passage); -1 pads the known lists."""
    rows = torch.arange(100, 100 + batch * group)
    rows[group] = rows[0]  # query 1's positive is query 0's positive
    rows[2 * group + 1] = rows[3 * group]  # query 2's hard negative is query 3's positive
    known = torch.full((batch, 3), -1)
    known[0, :1] = rows[0]
    known[1, :2] = torch.tensor([rows[group], rows[2 * group + 2]])  # query 1 also knows query 2's 2nd negative
    known[2, :1] = rows[2 * group]
    known[3, :2] = torch.tensor([rows[3 * group], rows[0]])
    names = [{int(r) for r in known[i] if r >= 0} for i in range(batch)]
    return rows, known, names


@pytest.mark.parametrize("directions", DIRECTION_SETS)
@pytest.mark.parametrize("guided", [False, True])
def test_labelled_positives_leave_the_pool_like_a_naive_loop(directions, guided):
    query, passage = embeddings()
    rows, known, names = shared_passage_labels()
    strategy = "absolute" if guided else None
    guide = sign_guide() if guided else (None, None)
    loss_fn = ContrastiveLoss(temperature=0.1, similarity="cos", directions=directions, guide_margin_strategy=strategy,
                              guide_margin=0.25 if guided else 0.0)
    vectorised = loss_fn(query, passage, *guide, passage_rows=rows, known_rows=known)
    reference = naive_loss(query, passage, 0.1, "cos", directions, *guide, strategy=strategy, margin=0.25 if guided else 0.0,
                           rows=rows.tolist(), known=names)
    torch.testing.assert_close(vectorised, reference, rtol=1e-10, atol=1e-10)
    for got, expected in zip(torch.autograd.grad(vectorised, (query, passage)), torch.autograd.grad(reference, (query, passage))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # The labels change the loss: without them the copy of query 0's positive is one of query 1's negatives.
    assert not torch.isclose(loss_fn(query, passage, *guide), vectorised)


def test_labels_come_in_pairs_and_in_the_batch_layout():
    query, passage = embeddings()
    rows, known, _ = shared_passage_labels()
    loss_fn = ContrastiveLoss()
    with pytest.raises(ValueError, match="come together"):
        loss_fn(query, passage, passage_rows=rows)
    with pytest.raises(ValueError, match="do not match"):
        loss_fn(query, passage, passage_rows=rows[:-1], known_rows=known)


def test_relative_margin_is_sign_safe():
    threshold = guide_threshold(torch.tensor([-0.5, 0.5, 0.0]), "relative", 0.5)
    torch.testing.assert_close(threshold, torch.tensor([[-0.75], [0.25], [0.0]]))


def test_tie_at_threshold_is_kept_and_positive_is_never_dropped():
    query, passage = embeddings(seed=6)
    same = torch.ones(4, 4, dtype=torch.float64)
    guide_query, guide_passage = same, same.repeat(3, 1)  # every guide similarity is exactly g_pos = 1
    plain = ContrastiveLoss(0.05, "cos", DIRECTIONS)(query, passage)
    # Threshold g_pos: every candidate ties, nothing is dropped.
    tied = ContrastiveLoss(0.05, "cos", DIRECTIONS, guide_margin_strategy="none")(query, passage, guide_query, guide_passage)
    torch.testing.assert_close(tied, plain, rtol=0, atol=0)
    # Threshold below g_pos: every candidate is dropped, the positive (also above it) stays, loss is 0.
    only_positive = ContrastiveLoss(0.05, "cos", DIRECTIONS, guide_margin_strategy="absolute", guide_margin=0.1)
    assert only_positive(query, passage, guide_query, guide_passage).item() == 0.0


def test_negative_rated_above_positive_is_dropped_positive_kept():
    query, passage = embeddings(batch=2, group=2, seed=7)
    guide_query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Query 0's hard negative (row 1) is rated above its positive (row 0); everything else is far below.
    guide_passage = torch.tensor([[1.0, 1.0], [1.0, 0.1], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    loss = ContrastiveLoss(1.0, "dot", guide_margin_strategy="none", reduction="none")(query, passage, guide_query, guide_passage)
    scores = query @ passage.T
    expected_0 = torch.logsumexp(scores[0, [0, 2, 3]], 0) - scores[0, 0]
    torch.testing.assert_close(loss[0], expected_0)
    torch.testing.assert_close(loss[1], torch.logsumexp(scores[1], 0) - scores[1, 2])


def test_masks_by_hand():
    masks = candidate_masks(2, 2, DIRECTIONS)
    assert masks[Q2P].all()
    assert masks[Q2Q].tolist() == [[False, True], [True, False]]
    assert masks[P2Q].tolist() == [[False, True], [True, False]]
    assert masks[P2P].tolist() == [[False, False, True, True], [True, True, False, False]]


def test_low_precision_is_scored_in_float32():
    query, passage = (t.detach().float() for t in embeddings())
    loss_fn = ContrastiveLoss(0.05, "cos", DIRECTIONS)
    reference = loss_fn(query, passage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(query, passage)
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)
    low = loss_fn(query.bfloat16(), passage.bfloat16())
    assert low.dtype == torch.float32
    # Only the rounding of the inputs to bfloat16 remains.
    torch.testing.assert_close(low, loss_fn(query.bfloat16().float(), passage.bfloat16().float()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(directions=(Q2Q, P2P)),
        dict(directions=("query_to_doc",)),
        dict(directions=(Q2P, Q2P)),
        dict(temperature=0.0),
        dict(similarity="l2"),
        dict(guide_margin_strategy="soft"),
        dict(guide_margin_strategy="none", guide_margin=0.1),
        dict(guide_margin_strategy="absolute", guide_margin=-0.1),
    ],
)
def test_bad_options_are_refused_in_one_line(options):
    with pytest.raises(RagkitError) as info:
        ContrastiveLoss(**options)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_refused():
    query, passage = embeddings(batch=4, group=3)
    with pytest.raises(ValueError, match="multiple"):
        ContrastiveLoss()(query, passage[:-1])
    with pytest.raises(ValueError, match="guide"):
        ContrastiveLoss(guide_margin_strategy="none")(query, passage)
    with pytest.raises(ValueError, match="guide"):
        ContrastiveLoss()(query, passage, query, passage)


# sentence-transformers on identical embeddings.


@pytest.fixture(scope="module")
def st_losses():
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    if "partition_mode" not in inspect.signature(losses.MultipleNegativesRankingLoss.__init__).parameters:
        pytest.skip("this sentence-transformers has no MultipleNegativesRankingLoss(partition_mode=...)")
    return losses


def columns(passage, group):
    """Our grouped rows -> sentence-transformers' columns (positives, then the k-th hard negatives)."""
    return list(passage.view(-1, group, passage.size(-1)).unbind(1))


@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=lambda d: "+".join(x.replace("_to_", "2") for x in d))
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_peer_multiple_negatives_ranking_loss(st_losses, directions, similarity):
    from sentence_transformers import util

    query, passage = embeddings(group=3, seed=8)
    temperature = 0.05 if similarity == "cos" else 0.5
    peer = st_losses.MultipleNegativesRankingLoss(
        model=None,
        scale=1.0 / temperature,
        similarity_fct=util.cos_sim if similarity == "cos" else util.dot_score,
        directions=tuple(d.replace("passage", "doc") for d in directions),
        partition_mode="joint",
    )
    theirs = peer.compute_loss_from_embeddings([query, *columns(passage, 3)], None)
    ours = ContrastiveLoss(temperature, similarity, directions, reduction="none")(query, passage)
    if P2Q in directions:
        # Their d->q block keeps j == i, a second copy of the positive: softplus(ours) per query, exactly.
        ours = F.softplus(ours)
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-10, atol=1e-10)


class _FixedEmbeddings(torch.nn.Module):
    """Stands in for a SentenceTransformer: returns the embedding stored under ``key`` in the features."""

    def __init__(self, key, tokenizer):
        super().__init__()
        self.key = key
        self.tokenizer = tokenizer
        self.max_seq_length = 32

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("vocab")
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    return BertTokenizer.from_pretrained(directory)


@pytest.mark.parametrize(
    "strategy,margin,their_strategy",
    [("none", 0.0, "absolute"), ("absolute", 0.1, "absolute"), ("relative", 0.2, "relative")],
)
@pytest.mark.parametrize(
    "group,contrast_anchors,contrast_positives",
    [(1, False, False), (1, True, False), (1, False, True), (1, True, True), (2, False, False), (2, True, False)],
)
def test_peer_gist_embed_loss(st_losses, tiny_tokenizer, strategy, margin, their_strategy, group, contrast_anchors, contrast_positives):
    query, passage = embeddings(batch=6, group=group, dim=8, seed=9)
    guide_query, guide_passage = (t.detach() for t in embeddings(batch=6, group=group, dim=5, seed=10))
    # Pull a few guide candidates close to the anchors so the filter has something to drop.
    guide_passage[group] = guide_query[0] + 0.05 * guide_passage[group]
    guide_query[2] = guide_query[3] + 0.3 * guide_query[2]
    features = [{"emb": query, "guide": guide_query}] + [
        {"emb": column, "guide": guide_column} for column, guide_column in zip(columns(passage, group), columns(guide_passage, group))
    ]
    peer = st_losses.GISTEmbedLoss(
        _FixedEmbeddings("emb", tiny_tokenizer),
        _FixedEmbeddings("guide", tiny_tokenizer),
        temperature=0.05,
        margin_strategy=their_strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
    )
    theirs = peer(features, None)
    directions = (Q2P,) + ((Q2Q,) if contrast_anchors else ()) + ((P2P,) if contrast_positives else ())
    loss_fn = ContrastiveLoss(0.05, "cos", directions, guide_margin_strategy=strategy, guide_margin=margin)
    ours = loss_fn(query, passage, guide_query, guide_passage)
    unguided = ContrastiveLoss(0.05, "cos", directions)(query, passage)
    assert not math.isclose(ours.item(), unguided.item())  # the guide did drop something
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
