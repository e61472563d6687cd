"""Negative cache: the samplers against the softmax they claim (chi-square), the estimator's gradient
against the full-cache cross-entropy, replacement order, masks, and the 2-process sharded draw."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import chisquare

from ragkit.retriever.losses import DIRECTIONS, ContrastiveLoss
from ragkit.retriever.negative_cache import sampling, store
from ragkit.retriever.negative_cache.estimator import cache_loss, staleness
from ragkit.retriever.negative_cache.masks import build_cache_mask
from ragkit.retriever.negative_cache.sampling import gumbel_max_sample, sharded_gumbel_max_sample
from ragkit.retriever.negative_cache.sharded import distributed_draw, refresh_drawn
from ragkit.retriever.negative_cache.store import NegativeCache

SEED = 1234


def _p_value(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of integer draws to ``probs``."""
    counts = np.bincount(draws.flatten().numpy(), minlength=probs.numel())
    probs = probs.double().numpy()
    expected = probs / probs.sum() * counts.sum()
    return float(chisquare(counts, expected).pvalue)


def _tokens(count: int, max_length: int, generator: torch.Generator):
    """Right-padded text-pair token rows with random lengths and second-segment starts."""
    lengths = torch.randint(3, max_length + 1, (count,), generator=generator)
    starts = (torch.rand(count, generator=generator) * (lengths - 1)).long() + 1
    columns = torch.arange(max_length)
    mask = (columns < lengths[:, None]).long()
    types = ((columns >= starts[:, None]) & mask.bool()).long()
    ids = torch.randint(1, 50, (count, max_length), generator=generator) * mask
    return ids, mask, types


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_elements", [None, 30_000])
def test_gumbel_max_matches_softmax(noise_elements, monkeypatch):
    if noise_elements is not None:  # many small noise blocks instead of one
        monkeypatch.setattr(sampling, "_NOISE_ELEMENTS", noise_elements)
    logits = torch.linspace(-1.5, 1.5, 10)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    draws = gumbel_max_sample(logits[None], 40_000, torch.Generator().manual_seed(SEED))
    assert draws.shape == (1, 40_000)
    assert _p_value(draws, logits.softmax(0)) > 1e-3


def test_chi_square_rejects_a_wrong_sampler():
    """The check above can fail: Gaussian instead of Gumbel noise (same variance) is caught, and so are the
    right draws compared with a slightly sharper softmax."""
    logits = torch.linspace(-1.5, 1.5, 10)
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(40_000, 10, generator=generator) * (torch.pi / 6**0.5)
    wrong = (logits + noise).argmax(1)
    assert _p_value(wrong, logits.softmax(0)) < 1e-6
    right = gumbel_max_sample(logits[None], 40_000, generator)
    assert _p_value(right, (logits * 1.15).softmax(0)) < 1e-6


def test_top_k_and_mask_are_respected():
    generator = torch.Generator().manual_seed(SEED)
    logits = torch.randn(3, 20, generator=generator)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, logits[0].topk(2).indices] = True  # the two best of row 0 are masked, so top-k must skip them
    mask[1, 5:] = True
    mask[2, :] = True
    draws = gumbel_max_sample(logits, 20_000, generator, top_k=4, mask=mask)
    assert (draws[2] == -1).all()  # nothing allowed: no draw
    for row in range(2):
        allowed = logits[row].masked_fill(mask[row], float("-inf"))
        top = allowed.topk(4).indices
        assert set(draws[row].unique().tolist()) <= set(top.tolist())
        assert not mask[row, draws[row]].any()
        probs = torch.zeros(20).index_put_((top,), allowed[top].softmax(0))
        keep = probs > 0
        remap = torch.full((20,), -1).index_put_((keep.nonzero()[:, 0],), torch.arange(int(keep.sum())))
        assert _p_value(remap[draws[row]], probs[keep]) > 1e-3
    # An unrestricted draw of row 1 reaches all five allowed entries.
    assert set(gumbel_max_sample(logits, 5_000, generator, mask=mask)[1].unique().tolist()) == set(range(5))


def _global_index(sample, sizes):
    offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
    return offsets[sample.shard.clamp(min=0)] + sample.index


@pytest.mark.parametrize("top_k", [None, 6])
def test_sharded_draw_matches_global_softmax(top_k):
    sizes = [4, 7, 5]
    generator = torch.Generator().manual_seed(SEED)
    shards = [torch.randn(2, n, generator=generator) for n in sizes]
    masks = [torch.zeros(2, n, dtype=torch.bool) for n in sizes]
    masks[1][0, :] = True  # query 0 can use nothing of shard 1
    masks[2][1, 0] = True
    sample = sharded_gumbel_max_sample(
        shards, 40_000, [torch.Generator().manual_seed(SEED + r) for r in range(3)],
        torch.Generator().manual_seed(SEED - 1), top_k=top_k, masks=masks)
    full = torch.cat([s.masked_fill(m, float("-inf")) for s, m in zip(shards, masks)], dim=1)  # (2, 16)
    if top_k is not None:
        full = full.masked_fill(full < full.topk(top_k, dim=1).values[:, -1:], float("-inf"))
    torch.testing.assert_close(sample.lse, torch.logsumexp(full, dim=1))
    draws = _global_index(sample, sizes)
    for row in range(2):
        probs = full[row].softmax(0)
        allowed = torch.isfinite(full[row])
        assert allowed[draws[row]].all()
        remap = torch.full((16,), -1).index_put_((allowed.nonzero()[:, 0],), torch.arange(int(allowed.sum())))
        assert _p_value(remap[draws[row]], probs[allowed]) > 1e-3


# --------------------------------------------------------------------------------------------------
# Masks and the store
# --------------------------------------------------------------------------------------------------


def test_build_cache_mask_matches_a_loop():
    cache_ids = torch.tensor([40, 3, 17, 8, 99, 21])
    positives = [[3], [8, 99], []]
    excluded = [[21], [], [40, 5]]  # 5 is not cached
    batch_ids = [17, 1000]
    mask = build_cache_mask(cache_ids, positives, excluded, batch_ids)
    expected = torch.tensor([[pid in set(p) | set(e) | set(batch_ids) for pid in cache_ids.tolist()]
                             for p, e in zip(positives, excluded)])
    assert torch.equal(mask, expected)
    padded = torch.tensor([[3, -1], [8, 99], [-1, -1]])
    assert torch.equal(build_cache_mask(cache_ids, padded, excluded, batch_ids), expected)
    with pytest.raises(ValueError, match="unique"):
        build_cache_mask(torch.tensor([1, 2, 1]), [[1]])


def _filled(policy: str, capacity: int = 4, dtype=torch.float32) -> NegativeCache:
    return NegativeCache(capacity, 2, 5, dtype=dtype, policy=policy)


def _add(cache: NegativeCache, ids: list[int], scale: float = 1.0):
    count = len(ids)
    embeddings = torch.tensor(ids, dtype=torch.float32)[:, None].repeat(1, 2) * scale
    input_ids, mask, types = _tokens(count, 5, torch.Generator().manual_seed(sum(ids)))
    return cache.add(embeddings, torch.tensor(ids), input_ids, mask, types), (input_ids, mask, types)


def _cached_ids(cache: NegativeCache) -> set[int]:
    return set(cache.ids[: len(cache)].tolist())


@pytest.mark.parametrize("policy, evicted", [("fifo", 1), ("lru", 2)])
def test_replacement_order(policy, evicted):
    cache = _filled(policy)
    _add(cache, [0, 1, 2])
    _add(cache, [3, 4])  # one free slot, then the oldest (0) goes
    assert len(cache) == 4 and _cached_ids(cache) == {1, 2, 3, 4}
    slot_of_1 = int((cache.ids == 1).nonzero())
    cache.update(torch.tensor([slot_of_1]), torch.full((1, 2), 7.0))  # a refresh: LRU now keeps 1
    assert torch.equal(cache.embeddings[slot_of_1], torch.full((2,), 7.0))
    _add(cache, [5])
    assert _cached_ids(cache) == {1, 2, 3, 4, 5} - {evicted}


def test_readding_a_cached_id_overwrites_it():
    cache = _filled("fifo")
    _add(cache, [0, 1, 2, 3])
    slots, _ = _add(cache, [2, 9, 9], scale=10.0)  # 2 is cached; 9 twice in one call is stored once
    assert len(cache) == 4 and _cached_ids(cache) == {1, 2, 3, 9}
    assert torch.equal(cache.embeddings[slots[0]], torch.full((2,), 20.0))
    _add(cache, [10])  # 2 was re-added after 1 and 3, so 1 is now the oldest
    assert _cached_ids(cache) == {2, 3, 9, 10}


def test_add_larger_than_capacity_keeps_the_newest():
    cache = _filled("lru")
    _add(cache, [0, 1])
    _add(cache, list(range(10, 16)))
    assert _cached_ids(cache) == {12, 13, 14, 15}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_round_trip_and_nbytes(dtype):
    cache = NegativeCache(6, 3, 8, dtype=dtype)
    generator = torch.Generator().manual_seed(SEED)
    input_ids, mask, types = _tokens(4, 8, generator)
    slots = cache.add(torch.randn(4, 3, generator=generator), torch.arange(4), input_ids, mask, types)
    back = cache.tokens(slots)
    width = int(mask.sum(1).max())
    assert torch.equal(back["input_ids"], input_ids[:, :width])
    assert torch.equal(back["attention_mask"], mask[:, :width])
    assert torch.equal(back["token_type_ids"], types[:, :width])
    element = 4 if dtype == torch.float32 else 2
    assert cache.nbytes == 6 * (3 * element + 8 * 4 + 8 + 4 + 4 + 8)


def test_bad_token_rows_are_refused():
    cache = NegativeCache(4, 2, 4)
    left_padded = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        cache.add(torch.zeros(1, 2), torch.tensor([0]), torch.ones(1, 4, dtype=torch.long), left_padded)
    with pytest.raises(ValueError, match="max_length"):
        cache.add(torch.zeros(1, 2), torch.tensor([0]), torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6))
    assert len(cache) == 0


def test_state_dict_round_trip():
    cache = _filled("lru")
    _add(cache, [0, 1, 2, 3])
    copy = _filled("lru")
    copy.load_state_dict(cache.state_dict())
    _add(cache, [7])
    _add(copy, [7])
    assert _cached_ids(copy) == _cached_ids(cache) and torch.equal(copy.embeddings, cache.embeddings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_scores_match_a_direct_computation(dtype, similarity, monkeypatch):
    monkeypatch.setattr(store, "_SCORE_CHUNK_ROWS", 3)  # 7 entries: blocks of 3, 3 and 1
    generator = torch.Generator().manual_seed(SEED)
    cache = NegativeCache(10, 4, 3, dtype=dtype)
    embeddings = torch.randn(7, 4, generator=generator) * 3
    cache.add(embeddings, torch.arange(7), torch.ones(7, 3, dtype=torch.long), torch.ones(7, 3, dtype=torch.long))
    query = torch.randn(2, 4, generator=generator)
    stored = embeddings.to(dtype).float()
    if similarity == "cos":
        expected = torch.nn.functional.cosine_similarity(query[:, None], stored[None], dim=-1) / 0.1
    else:
        expected = query @ stored.T / 0.1
    torch.testing.assert_close(cache.scores(query, 0.1, similarity), expected, rtol=1e-5, atol=1e-4)


def test_staleness():
    fresh = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    cached = torch.tensor([[3.0, 4.0], [1.0, 0.5]])
    assert staleness(cached, fresh).item() == pytest.approx(0.25)
    assert staleness(cached, fresh, torch.tensor([True, False])).item() == 0.0


# --------------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------------

B, G, D, N, TAU = 3, 2, 8, 40, 0.7


def _problem():
    generator = torch.Generator().manual_seed(SEED)
    query = (torch.randn(B, D, generator=generator) * 0.6).requires_grad_()
    passage = (torch.randn(B * G, D, generator=generator) * 0.6).requires_grad_()
    fresh_cache = (torch.randn(N, D, generator=generator) * 0.6).requires_grad_()  # the live encoder's view
    cache = NegativeCache(N, D, 6)
    input_ids, mask, types = _tokens(N, 6, generator)
    slots = cache.add(fresh_cache.detach(), torch.arange(N), input_ids, mask, types)
    assert torch.equal(slots, torch.arange(N))  # slot n holds row n: cached == fresh, row for row
    return query, passage, fresh_cache, cache


def _naive_cross_entropy(query, passage, cache_embeddings, excluded):
    """Mean over queries of -log p(positive) over every in-batch passage and every allowed cache item."""
    losses = []
    for i in range(query.size(0)):
        batch = [query[i] @ passage[j] / TAU for j in range(passage.size(0))]
        cached = [query[i] @ cache_embeddings[n] / TAU for n in range(cache_embeddings.size(0))
                  if n not in excluded[i]]
        losses.append(torch.logsumexp(torch.stack(batch + cached), 0) - batch[i * G])
    return torch.stack(losses).mean()


def _gradients(loss, tensors):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, tensors)])


def _estimator(query, passage, fresh_cache, cache, excluded, samples, seed):
    draw = cache.draw(query.detach(), num_samples=samples, generator=torch.Generator().manual_seed(seed),
                      temperature=TAU, excluded_ids=excluded)
    drawn = fresh_cache[draw.slot.clamp(min=0).flatten()]  # (B * S, D): "re-encoding" the drawn items
    return cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=TAU)


def test_estimator_gradient_converges_to_full_cache_gradient():
    query, passage, fresh_cache, cache = _problem()
    excluded = [[0, 5], [1], [2, 30, 31]]  # positives and answer-bearing passages kept out of the cache
    tensors = (query, passage, fresh_cache)
    full = _naive_cross_entropy(query, passage, fresh_cache, excluded)
    exact = _gradients(full, tensors)
    errors = {}
    for samples in (20, 20_000):
        out = _estimator(query, passage, fresh_cache, cache, excluded, samples, SEED)
        torch.testing.assert_close(out.loss, full)  # logged value: the exact cross-entropy
        torch.testing.assert_close(out.cross_entropy, full.detach())
        estimate = _gradients(out.loss, tensors)
        errors[samples] = float((estimate - exact).norm() / exact.norm())
    assert errors[20_000] < 0.03, errors
    assert errors[20_000] < errors[20] / 4, errors


def test_estimator_is_exact_with_one_cache_candidate():
    query, passage, fresh_cache, cache = _problem()
    excluded = [[n for n in range(N) if n != keep] for keep in (4, 9, 4)]
    tensors = (query, passage, fresh_cache)
    exact = _gradients(_naive_cross_entropy(query, passage, fresh_cache, excluded), tensors)
    estimate = _gradients(_estimator(query, passage, fresh_cache, cache, excluded, 1, SEED).loss, tensors)
    torch.testing.assert_close(estimate, exact)


def test_empty_cache_reduces_to_in_batch_cross_entropy():
    query, passage, _, _ = _problem()
    cache = NegativeCache(8, D, 6)
    draw = cache.draw(query.detach(), num_samples=2, temperature=TAU)
    assert not draw.valid.any() and torch.isinf(draw.lse).all()
    assert draw.input_ids.shape == (B * 2, 1) and draw.attention_mask.sum() == B * 2  # encodable rows
    drawn = torch.randn(B * 2, D).requires_grad_()
    out = cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=TAU)
    exact = _naive_cross_entropy(query, passage, torch.zeros(0, D), [[]] * B)
    grad_query, grad_passage, grad_drawn = torch.autograd.grad(out.loss, (query, passage, drawn))
    torch.testing.assert_close(torch.cat([grad_query.flatten(), grad_passage.flatten()]),
                               _gradients(exact, (query, passage)))
    assert torch.equal(grad_drawn, torch.zeros(B * 2, D))


@pytest.mark.parametrize("directions", [("query_to_passage",), DIRECTIONS])
def test_labelled_positives_leave_the_in_batch_pool_as_in_the_contrastive_loss(directions):
    """With an empty cache the estimator is the in-batch loss; labels mask the same candidates in both."""
    query, passage, _, _ = _problem()
    rows = torch.arange(B * G)
    rows[G] = rows[0]  # query 1's positive is a copy of query 0's
    known = torch.tensor([[0, -1], [0, 4], [4, -1]])  # query 2's positive (row 4) is also known for query 1
    draw = NegativeCache(8, D, 6).draw(query.detach(), num_samples=1, temperature=TAU)
    drawn = torch.zeros(B, D)
    out = cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=TAU, directions=directions,
                     passage_rows=rows, known_rows=known)
    reference = ContrastiveLoss(temperature=TAU, directions=directions)(query, passage, passage_rows=rows, known_rows=known)
    torch.testing.assert_close(out.loss, reference)
    torch.testing.assert_close(_gradients(out.loss, (query, passage)), _gradients(reference, (query, passage)))
    unlabelled = cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=TAU, directions=directions)
    assert not torch.isclose(unlabelled.loss, out.loss)


def test_draw_returns_items_tokens_and_refresh_writes_back():
    query, _, fresh_cache, cache = _problem()
    draw = cache.draw(query.detach(), num_samples=2, generator=torch.Generator().manual_seed(SEED),
                      temperature=TAU, batch_ids=[0, 1, 2, 3])
    slots = draw.slot.flatten()
    assert draw.valid.all() and (slots > 3).all() and torch.equal(draw.ids.flatten(), slots)
    torch.testing.assert_close(draw.cached.flatten(0, 1), fresh_cache.detach()[slots])
    tokens = cache.tokens(slots)
    width = draw.input_ids.size(1)
    for key, value in draw.inputs().items():
        padded = torch.zeros_like(value)
        padded[:, : tokens[key].size(1)] = tokens[key][:, :width]
        assert torch.equal(value, padded), key
    refreshed = draw.cached.flatten(0, 1) + 1.0
    assert staleness(draw.cached.flatten(0, 1), refreshed) > 0
    refresh_drawn(cache, draw, refreshed)
    torch.testing.assert_close(cache.embeddings[slots], refreshed)


# --------------------------------------------------------------------------------------------------
# torch.distributed: two processes, one shard each, against the pure function
# --------------------------------------------------------------------------------------------------

WORLD, LOCAL, DIST_DIM, SAMPLES = 2, 3, 6, 3
CASES = {"all": None, "top": 4}


def _shard(rank: int) -> NegativeCache:
    generator = torch.Generator().manual_seed(50 + rank)
    size = (6, 5)[rank]
    cache = NegativeCache(8, DIST_DIM, 7)
    input_ids, mask, types = _tokens(size, 7, generator)
    cache.add(torch.randn(size, DIST_DIM, generator=generator), torch.arange(size) + 100 * rank,
              input_ids, mask, types)
    return cache


def _dist_queries() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL, DIST_DIM, generator=torch.Generator().manual_seed(77))


# Query 1 can use nothing of shard 1; query 5 nothing at all. Rank 0 sends 1-5 ids a row, rank 1 up to 11.
_EXCLUDED = [[0], [100, 101, 102, 103, 104], [3], [101], [2, 102], [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104]]
_BATCH_IDS = [[4], [103]]


def _gens(rank: int, case: str):
    return torch.Generator().manual_seed(10 + rank + 100 * len(case)), torch.Generator().manual_seed(999)


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cache = _shard(rank)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for case, top_k in CASES.items():
            generator, shard_generator = _gens(rank, case)
            draw = distributed_draw(cache, _dist_queries()[rows], generator=generator,
                                    shard_generator=shard_generator, num_samples=SAMPLES, temperature=0.5,
                                    excluded_ids=_EXCLUDED[rows], batch_ids=_BATCH_IDS[rank], top_k=top_k)
            results[case] = dataclasses.asdict(draw)
        refresh_drawn(cache, draw, draw.cached.flatten(0, 1) * 2 + 1)
        results["after_refresh"] = cache.embeddings[: len(cache)].clone()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_draw_matches_sharded_function(tmp_path):
    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    shards = [_shard(r) for r in range(WORLD)]
    union_batch = [i for ids in _BATCH_IDS for i in ids]
    logits = [s.scores(_dist_queries(), temperature=0.5) for s in shards]
    masks = [build_cache_mask(s.ids[: len(s)], _EXCLUDED, batch_ids=union_batch) for s in shards]
    for case, top_k in CASES.items():
        sample = sharded_gumbel_max_sample(logits, SAMPLES, [_gens(r, case)[0] for r in range(WORLD)],
                                           _gens(0, case)[1], top_k=top_k, masks=masks)
        assert (sample.shard[1] != 1).all() and (sample.shard[5] == -1).all()
        assert set(sample.shard.flatten().tolist()) == {-1, 0, 1}
        for rank, result in enumerate(results):
            draw, rows = result[case], slice(rank * LOCAL, (rank + 1) * LOCAL)
            assert torch.equal(draw["shard"], sample.shard[rows])
            torch.testing.assert_close(draw["lse"], sample.lse[rows])
            for q in range(LOCAL):
                for s in range(SAMPLES):
                    owner, index = int(sample.shard[rows][q, s]), int(sample.index[rows][q, s])
                    if owner < 0:
                        assert not draw["valid"][q, s] and draw["ids"][q, s] == -1
                        continue
                    assert draw["slot"][q, s] == index and draw["ids"][q, s] == shards[owner].ids[index]
                    torch.testing.assert_close(draw["cached"][q, s], shards[owner].embeddings[index])
                    want = shards[owner].tokens(torch.tensor([index]))
                    length = int(want["attention_mask"].sum())
                    row = q * SAMPLES + s
                    for key in ("input_ids", "attention_mask", "token_type_ids"):
                        assert torch.equal(draw[key][row, :length], want[key][0, :length]), key
                    assert draw["attention_mask"][row, length:].sum() == 0
    # The last draw's items were refreshed on the rank that owns them, whoever drew them.
    for rank, result in enumerate(results):
        draw = result["top"]
        for owner, slot, cached in zip(draw["shard"].flatten(), draw["slot"].flatten(), draw["cached"].flatten(0, 1)):
            if owner >= 0:
                torch.testing.assert_close(results[owner]["after_refresh"][slot], cached * 2 + 1)
