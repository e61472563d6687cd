"""GTE directions, GISTEmbed guidance and the negative cache compose with the gradient cache, with gathered
representations across processes, and with each other.

Every check compares a production step against an independent computation: one graph over the whole batch
whose chunks are encoded in the same order under the same seed, so dropout (on throughout) draws the same
masks. Two gloo processes (one spawn serves every case) are compared with one process on the concatenated
batch, each rank's rows encoded under that rank's seed and chunking.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertModel

from gloo import spawn_and_collect

from ragkit.config import TrainRetrieverConfig
from ragkit.errors import RagkitError
from ragkit.retriever.data import Batch
from ragkit.retriever.distributed import cleanup_distributed, global_loss, init_distributed, shard_batch
from ragkit.retriever.encoder import BiEncoder
from ragkit.retriever.gradcache import GradCache, full_batch_step
from ragkit.retriever.losses import DIRECTIONS, ContrastiveLoss
from ragkit.retriever.negative_cache.estimator import cache_loss
from ragkit.retriever.negative_cache.step import NegativeCacheStep

WORLD = 2
BATCH, GROUP = 6, 3  # 6 queries, each with a positive and 2 hard negatives
LOCAL_BATCH = BATCH // WORLD
CHUNKS = (2, 4)  # neither divides the local 3 queries / 9 passages
CACHE_CHUNK = 2  # the negative cache step's chunk, for both towers
VOCAB, DIM, TEMPERATURE = 40, 32, 0.05
LOSS_CASES = {
    "gte": dict(directions=DIRECTIONS),
    "gist-none": dict(guide_margin_strategy="none"),
    "gist-absolute": dict(guide_margin_strategy="absolute", guide_margin=0.05),
    "gist-relative": dict(guide_margin_strategy="relative", guide_margin=0.05),
    "gte-gist": dict(directions=DIRECTIONS, guide_margin_strategy="absolute", guide_margin=0.05),
}
CACHE_DIRECTIONS = {"dpr": ("query_to_passage",), "gte": DIRECTIONS}
CACHE_CASES = [(kind, chunk) for kind in CACHE_DIRECTIONS for chunk in (0, CACHE_CHUNK)]


def tiny_bert(seed: int, initializer_range: float = 0.02) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        initializer_range=initializer_range,
    )
    return BertModel(config, add_pooling_layer=False)


def tiny_encoder() -> BiEncoder:
    return BiEncoder(tiny_bert(0), None, pooling="mean", normalize=True).train()


def guide_encoder() -> BiEncoder:
    # A wide initialisation spreads the guide's cosines, so each strategy masks some candidates but not all.
    return BiEncoder(tiny_bert(7, initializer_range=1.0), None, pooling="mean", normalize=False).eval().requires_grad_(False)


def token_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (rows, length), right padding
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return token_batch(BATCH, 7, seed=1), token_batch(BATCH * GROUP, 11, seed=2)


def make_loss(case: str) -> ContrastiveLoss:
    return ContrastiveLoss(temperature=TEMPERATURE, **LOSS_CASES[case])


def guide_inputs(case: str, query, passage) -> dict[str, torch.Tensor]:
    if "guide_margin_strategy" not in LOSS_CASES[case]:
        return {}
    guide = guide_encoder()
    with torch.no_grad():
        return {"guide_query": guide(**query, tower="query"), "guide_passage": guide(**passage, tower="passage")}


def rows_of(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {name: value[start:stop] for name, value in inputs.items()}


def graph_encode(model, inputs: dict[str, torch.Tensor], tower: str, chunk: int | None) -> torch.Tensor:
    """Every chunk forwarded with the graph, in order (``None``: the whole batch at once)."""
    rows = inputs["input_ids"].size(0)
    chunk = chunk or rows
    return torch.cat([model(**rows_of(inputs, i, i + chunk), tower=tower) for i in range(0, rows, chunk)])


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in model.named_parameters()}
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing[:3]}"
    return grads


def assert_same_step(loss, grads, reference_loss, reference_grads, label=""):
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5, msg=lambda m: f"{label} loss: {m}")
    for name, grad in reference_grads.items():
        assert grads[name] is not None, f"{label} {name} has no gradient"
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{label} {name}: {m}")


def dropout_seed(rank: int) -> int:
    return 100 + rank


# --- negative cache fixtures -------------------------------------------------------------------------


def cache_batch(query, passage, first_row: int) -> Batch:
    """A training batch whose passages are dataset rows ``first_row ..``; each query's positive is its group's first."""
    queries, passages = query["input_ids"].size(0), passage["input_ids"].size(0)
    rows = list(range(first_row, first_row + passages))
    return Batch(query=query, passage=passage, query_ids=[f"q{first_row + i}" for i in range(queries)],
                 questions=[""] * queries, passage_ids=[str(r) for r in rows], passage_rows=rows,
                 positive_rows=[[rows[i * GROUP]] for i in range(queries)], titles=[""] * passages, texts=[""] * passages)


def cache_step(model, kind: str, chunk: int, rank: int) -> NegativeCacheStep:
    """A step whose cache shard already holds 6 passages (ids 100 + 10 * rank + k) with stale embeddings."""
    step = NegativeCacheStep(model, 32, DIM, 16, TEMPERATURE, "dot", torch.device("cpu"), seed=3, rank=rank,
                             autocast_dtype=None, scaler=None, directions=CACHE_DIRECTIONS[kind], chunk_size=chunk)
    tokens = token_batch(6, 9, seed=60 + rank)
    stale = F.normalize(torch.randn(6, DIM, generator=torch.Generator().manual_seed(50 + rank)), dim=-1)
    step.cache.add(stale, torch.arange(6) + 100 + 10 * rank, tokens["input_ids"], tokens["attention_mask"])
    return step


def recording_draws(step: NegativeCacheStep) -> list:
    """Make ``step`` remember every draw it makes."""
    draws = []
    draw = step.draw

    def remember(batch, query):
        draws.append(draw(batch, query))
        return draws[-1]

    step.draw = remember
    return draws


def drawn_tokens(draw) -> dict[str, torch.Tensor]:
    inputs = draw.inputs()
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def reference_cache_reps(model, query, passage, drawn, chunk: int):
    """The negative cache step's encodings with the graph: the plain step encodes queries, passages and drawn
    items in three forwards; the chunked one stacks passages and drawn items (right-padded to one width)
    and encodes them chunk by chunk after the queries."""
    query_reps = graph_encode(model, query, "query", chunk or None)
    if not chunk:
        return query_reps, graph_encode(model, passage, "passage", None), graph_encode(model, drawn, "passage", None)
    width = max(passage["input_ids"].size(1), drawn["input_ids"].size(1))
    stacked = {name: torch.cat([F.pad(passage[name], (0, width - passage[name].size(1))),
                                F.pad(drawn[name], (0, width - drawn[name].size(1)))]) for name in passage}
    rows = graph_encode(model, stacked, "passage", chunk)
    batch_rows = passage["input_ids"].size(0)
    return query_reps, rows[:batch_rows], rows[batch_rows:]


# --- two processes -----------------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed()
    try:
        # The DDP wrappers live inside these functions, so they are freed before the group.
        _contrastive_steps(rank, out_dir)
        _negative_cache_steps(rank, out_dir)
    finally:
        cleanup_distributed()


def _contrastive_steps(rank: int, out_dir: str) -> None:
    query, passage = global_batch()
    local_query, local_passage = shard_batch(query, rank, WORLD), shard_batch(passage, rank, WORLD)
    for case in LOSS_CASES:
        guide = shard_batch(guide_inputs(case, query, passage), rank, WORLD)
        for cached in (False, True):
            model = DistributedDataParallel(tiny_encoder())
            loss = global_loss(make_loss(case))
            torch.manual_seed(dropout_seed(rank))
            if cached:
                value = GradCache(model, loss, *CHUNKS)(local_query, local_passage, **guide)
            else:
                value = full_batch_step(model, loss, local_query, local_passage, **guide)
            grads = {name: p.grad for name, p in model.module.named_parameters()}
            torch.save({"loss": value, "grads": grads}, os.path.join(out_dir, f"{case}-{cached}-{rank}.pt"))


def _negative_cache_steps(rank: int, out_dir: str) -> None:
    query, passage = global_batch()
    local_query, local_passage = shard_batch(query, rank, WORLD), shard_batch(passage, rank, WORLD)
    batch = cache_batch(local_query, local_passage, first_row=rank * LOCAL_BATCH * GROUP)
    for kind, chunk in CACHE_CASES:
        model = DistributedDataParallel(tiny_encoder())
        step = cache_step(model, kind, chunk, rank)
        draws = recording_draws(step)
        torch.manual_seed(dropout_seed(rank))
        value = step(batch, local_query, local_passage)
        draw = draws[0]
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save({"loss": value, "grads": grads, "drawn": drawn_tokens(draw), "lse": draw.lse, "valid": draw.valid,
                    "ids": draw.ids, "shard": draw.shard},
                   os.path.join(out_dir, f"cache-{kind}-{chunk}-{rank}.pt"))



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    return spawn_and_collect(_worker, WORLD, out_dir)


# --- GTE and GIST --------------------------------------------------------------------------------------


def test_every_guide_strategy_masks_some_but_not_all_candidates():
    """Otherwise the GIST cases below could not tell a guided loss from an unguided one."""
    query, passage = global_batch()
    with torch.no_grad():
        model = tiny_encoder().eval()
        q, p = model(**query, tower="query"), model(**passage, tower="passage")
    losses = {}
    for case in LOSS_CASES:
        guide = guide_inputs(case, query, passage)
        losses[case] = float(make_loss(case)(q, p, **guide))
        if guide:
            unguided = float(ContrastiveLoss(TEMPERATURE, directions=make_loss(case).directions)(q, p))
            assert 0 < losses[case] < unguided, case
    assert len({round(value, 6) for value in losses.values()}) == len(LOSS_CASES)


@pytest.mark.parametrize("case", LOSS_CASES)
def test_gradient_cache_equals_one_graph(case):
    query, passage = global_batch()
    guide = guide_inputs(case, query, passage)
    cached, plain = tiny_encoder(), tiny_encoder()
    torch.manual_seed(123)
    loss = GradCache(cached, make_loss(case), *CHUNKS)(query, passage, **guide)
    torch.manual_seed(123)
    query_reps = graph_encode(plain, query, "query", CHUNKS[0])
    passage_reps = graph_encode(plain, passage, "passage", CHUNKS[1])
    reference = make_loss(case)(query_reps, passage_reps, **guide)
    reference.backward()
    assert_same_step(loss, gradients(cached), reference.detach(), gradients(plain), case)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_two_processes_equal_one_on_the_global_batch(ranks, case, cached):
    query, passage = global_batch()
    guide = guide_inputs(case, query, passage)
    model = tiny_encoder()
    query_chunk, passage_chunk = CHUNKS if cached else (None, None)
    query_reps, passage_reps = [], []
    for rank in range(WORLD):
        torch.manual_seed(dropout_seed(rank))
        query_reps.append(graph_encode(model, shard_batch(query, rank, WORLD), "query", query_chunk))
        passage_reps.append(graph_encode(model, shard_batch(passage, rank, WORLD), "passage", passage_chunk))
    reference = make_loss(case)(torch.cat(query_reps), torch.cat(passage_reps), **guide)
    reference.backward()
    for rank in range(WORLD):
        result = ranks[f"{case}-{cached}-{rank}"]
        assert_same_step(result["loss"], result["grads"], reference.detach(), gradients(model), f"rank {rank}")


# --- the negative cache ----------------------------------------------------------------------------------


def test_cache_estimator_with_gte_directions_is_the_exact_cross_entropy_with_one_cache_candidate():
    """With one allowed cache item per query whose cached embedding is current, the estimator's value and
    gradient are those of the cross-entropy over the GTE partition plus that item (a naive loop)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, generator=generator, requires_grad=True)
    passage = torch.randn(6, 8, generator=generator, requires_grad=True)  # G = 2
    drawn = torch.randn(3, 8, generator=generator, requires_grad=True)  # each query's single cache item
    t = 0.5
    lse = (query * drawn).sum(dim=1).detach() / t  # the draw's logsumexp over its one candidate
    out = cache_loss(query, passage, drawn, lse, temperature=t, directions=DIRECTIONS)
    out.loss.backward()
    estimated = [query.grad.clone(), passage.grad.clone(), drawn.grad.clone()]

    for tensor in (query, passage, drawn):
        tensor.grad = None
    total = 0.0
    for i in range(3):
        d_i = passage[2 * i]
        terms = [query[i] @ passage[k] for k in range(6)]  # q->p: every passage
        terms += [query[i] @ query[j] for j in range(3) if j != i]  # q->q
        terms += [d_i @ query[j] for j in range(3) if j != i]  # d->q
        terms += [d_i @ passage[k] for k in range(6) if k // 2 != i]  # d->d: other queries' passages
        terms.append(query[i] @ drawn[i])  # the cache
        total = total + torch.logsumexp(torch.stack(terms) / t, 0) - query[i] @ d_i / t
    naive = total / 3
    naive.backward()
    torch.testing.assert_close(out.loss, naive.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(estimated, (query.grad, passage.grad, drawn.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,chunk", CACHE_CASES, ids=[f"{k}-chunk{c}" for k, c in CACHE_CASES])
def test_negative_cache_step_equals_one_graph_with_the_same_draw(kind, chunk):
    """The trainer's step, plain (chunk 0) or through the gradient cache, against one graph over the same
    rows: loss, every gradient, and the cache's contents afterwards."""
    query, passage = global_batch()
    batch = cache_batch(query, passage, first_row=0)
    step = cache_step(tiny_encoder(), kind, chunk, rank=0)
    draws = recording_draws(step)
    torch.manual_seed(5)
    loss = step(batch, query, passage)
    draw = draws[0]
    assert draw.valid.all()

    model = tiny_encoder()
    reference_step = cache_step(model, kind, chunk, rank=0)  # same cache, same generators
    torch.manual_seed(5)
    query_reps = graph_encode(model, query, "query", chunk or None)
    same_draw = reference_step.draw(batch, query_reps)
    assert torch.equal(same_draw.ids, draw.ids)
    torch.manual_seed(5)
    query_reps, passage_reps, drawn_reps = reference_cache_reps(model, query, passage, drawn_tokens(draw), chunk)
    reference = cache_loss(query_reps, passage_reps, drawn_reps, draw.lse, draw.valid, temperature=TEMPERATURE,
                           directions=CACHE_DIRECTIONS[kind])
    reference.loss.backward()
    assert_same_step(loss, gradients(step.model), reference.loss.detach(), gradients(model), f"{kind} chunk {chunk}")
    assert float(reference.cache_mass.min()) > 0  # the cache enters the loss

    # The drawn items got their re-encoded embeddings back, the batch's passages entered the cache.
    expected = {int(i): rep for i, rep in zip(draw.ids.flatten(), drawn_reps.detach())}  # the last draw of an id wins
    expected.update({row: rep for row, rep in zip(batch.passage_rows, passage_reps.detach())})
    slot_of = {int(i): s for s, i in enumerate(step.cache.ids[: len(step.cache)])}
    assert set(expected) <= set(slot_of)
    for passage_id, rep in expected.items():
        torch.testing.assert_close(step.cache.embeddings[slot_of[passage_id]], rep, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,chunk", CACHE_CASES, ids=[f"{k}-chunk{c}" for k, c in CACHE_CASES])
def test_negative_cache_two_processes_equal_one_given_their_draws(ranks, kind, chunk):
    """Each rank draws from its own shard (exact over the union: tested in test_negative_cache); given those
    draws, the two-process step equals one process computing the estimator over the concatenated batch."""
    query, passage = global_batch()
    model = tiny_encoder()
    results = [ranks[f"cache-{kind}-{chunk}-{rank}"] for rank in range(WORLD)]
    parts = []
    for rank, result in enumerate(results):
        assert result["valid"].all()
        # Every item comes from the shard the draw names (shard r holds ids 100 + 10 * r + k).
        assert torch.equal((result["ids"] - 100) // 10, result["shard"])
        torch.manual_seed(dropout_seed(rank))
        parts.append(reference_cache_reps(model, shard_batch(query, rank, WORLD), shard_batch(passage, rank, WORLD),
                                          result["drawn"], chunk))
    query_reps, passage_reps, drawn_reps = (torch.cat(reps) for reps in zip(*parts))
    reference = cache_loss(query_reps, passage_reps, drawn_reps, torch.cat([r["lse"] for r in results]),
                           torch.cat([r["valid"] for r in results]), temperature=TEMPERATURE,
                           directions=CACHE_DIRECTIONS[kind])
    reference.loss.backward()
    for rank, result in enumerate(results):
        assert_same_step(result["loss"], result["grads"], reference.loss.detach(), gradients(model), f"rank {rank}")


def test_draws_reach_both_shards(ranks):
    shards = torch.cat([ranks[f"cache-{kind}-{chunk}-{rank}"]["shard"].flatten()
                        for kind, chunk in CACHE_CASES for rank in range(WORLD)])
    assert set(shards.tolist()) == {0, 1}


def test_config_accepts_the_negative_cache_with_the_gradient_cache_and_gte_but_not_a_guide():
    config = TrainRetrieverConfig(mine="m", negative_cache=8, chunk_size=4, loss="gte")
    assert (config.negative_cache, config.chunk_size, config.loss) == (8, 4, "gte")
    with pytest.raises(RagkitError, match="guide would have to score every cached passage"):
        TrainRetrieverConfig(mine="m", negative_cache=8, guide="g")
