"""The gradient cache gives the gradients of one graph over the whole batch, dropout included."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from ragkit.retriever import gradcache
from ragkit.retriever.encoder import BiEncoder
from ragkit.retriever.gradcache import GradCache, full_batch_step, split_inputs
from ragkit.retriever.losses import ContrastiveLoss
from ragkit.retriever.rng import RngState

BATCH, GROUP = 6, 3  # 6 queries, each with a positive and 2 hard negatives: 18 passages
VOCAB = 40


def tiny_bert(seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return BertModel(config, add_pooling_layer=False)


def tiny_encoder(shared: bool) -> BiEncoder:
    model = BiEncoder(tiny_bert(0), None if shared else tiny_bert(1), pooling="mean", normalize=True)
    return model.train()


def token_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (rows, length), right padding
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def batch():
    return token_batch(BATCH, 7, seed=1), token_batch(BATCH * GROUP, 11, seed=2)


def chunked_graph_step(model, loss_fn, query, passage, query_chunk, passage_chunk, **loss_kwargs):
    """Reference: every chunk forwarded WITH the graph, in the cache's order (queries, then passages), one
    loss over the concatenation, one backward. Same dropout draws as the cache, no cached gradients."""
    query_reps = torch.cat([
        model(query["input_ids"][i:i + query_chunk], query["attention_mask"][i:i + query_chunk], tower="query")
        for i in range(0, BATCH, query_chunk)
    ])
    passage_reps = torch.cat([
        model(passage["input_ids"][i:i + passage_chunk], passage["attention_mask"][i:i + passage_chunk], tower="passage")
        for i in range(0, BATCH * GROUP, passage_chunk)
    ])
    loss = loss_fn(query_reps, passage_reps, **loss_kwargs)
    loss.backward()
    return loss.detach()


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in model.named_parameters()}
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing[:3]}"
    return grads


def max_grad_difference(a, b) -> float:
    grads_a, grads_b = gradients(a), gradients(b)
    return max((grads_a[name] - grads_b[name]).abs().max().item() for name in grads_a)


def assert_same_gradients(a, b, atol=1e-5):
    grads_a, grads_b = gradients(a), gradients(b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("keep_last_graph", [True, False], ids=["keep-last", "replay-all"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("query_chunk,passage_chunk", [(2, 6), (4, 5), (1, 7), (6, 18)])
def test_cached_step_equals_one_graph_over_the_batch(batch, shared, query_chunk, passage_chunk, keep_last_graph):
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05, directions=("query_to_passage", "query_to_query", "passage_to_query", "passage_to_passage"))
    cached_model = tiny_encoder(shared)
    reference_model = copy.deepcopy(cached_model)

    torch.manual_seed(123)
    cached_loss = GradCache(cached_model, loss_fn, query_chunk, passage_chunk, keep_last_graph=keep_last_graph)(query, passage)
    rng_after_cache = torch.get_rng_state()
    torch.manual_seed(123)
    reference_loss = chunked_graph_step(reference_model, loss_fn, query, passage, query_chunk, passage_chunk)

    torch.testing.assert_close(cached_loss, reference_loss, atol=1e-6, rtol=1e-6)
    assert not cached_loss.requires_grad
    assert_same_gradients(cached_model, reference_model)
    # The replays run on forked generators: the run's random stream advances as if each chunk ran once.
    assert torch.equal(rng_after_cache, torch.get_rng_state())


@pytest.mark.parametrize("keep_last_graph", [True, False])
def test_the_last_chunk_of_each_tower_is_encoded_once(batch, keep_last_graph):
    query, passage = batch
    model = tiny_encoder(shared=True)
    rows = []
    model.register_forward_hook(lambda module, args, kwargs, out: rows.append((kwargs["tower"], out.size(0))), with_kwargs=True)
    GradCache(model, ContrastiveLoss(temperature=0.05), 4, 5, keep_last_graph=keep_last_graph)(query, passage)
    q_chunks, p_chunks = -(-BATCH // 4), -(-BATCH * GROUP // 5)
    replays = (q_chunks - keep_last_graph) + (p_chunks - keep_last_graph)
    assert len(rows) == q_chunks + p_chunks + replays
    assert sum(n for tower, n in rows if tower == "query") == 2 * BATCH - keep_last_graph * (BATCH - 4 * (q_chunks - 1))


def test_single_chunk_cache_equals_full_batch_step_with_dropout(batch):
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    cached_model = tiny_encoder(shared=False)
    plain_model = copy.deepcopy(cached_model)
    torch.manual_seed(7)
    cached_loss = GradCache(cached_model, loss_fn, BATCH, BATCH * GROUP)(query, passage)
    torch.manual_seed(7)
    plain_loss = full_batch_step(plain_model, loss_fn, query, passage)
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert_same_gradients(cached_model, plain_model)


def test_small_chunks_equal_full_batch_step_without_dropout(batch):
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    cached_model = tiny_encoder(shared=True).eval()
    plain_model = copy.deepcopy(cached_model)
    cached_loss = GradCache(cached_model, loss_fn, 4, 5)(query, passage)
    plain_loss = full_batch_step(plain_model, loss_fn, query, passage)
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-6, rtol=1e-5)
    assert_same_gradients(cached_model, plain_model)


def test_gradients_differ_without_rng_replay(batch, monkeypatch):
    """Guards the test above: with the replay disabled the second forward draws new dropout masks."""
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    monkeypatch.setattr(RngState, "__enter__", lambda self: self)
    monkeypatch.setattr(RngState, "__exit__", lambda self, *exc: None)
    cached_model = tiny_encoder(shared=True)
    reference_model = copy.deepcopy(cached_model)
    torch.manual_seed(123)
    cached_loss = GradCache(cached_model, loss_fn, 2, 6)(query, passage)
    torch.manual_seed(123)
    reference_loss = chunked_graph_step(reference_model, loss_fn, query, passage, 2, 6)
    torch.testing.assert_close(cached_loss, reference_loss)  # the loss comes from the first forward only
    assert max_grad_difference(cached_model, reference_model) > 1e-3


def test_rng_state_replays_dropout_and_restores_the_stream():
    dropout = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(0)
    state = RngState()
    first = dropout(x)
    after_first = torch.get_rng_state()
    with state:
        second = dropout(x)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), after_first)
    assert not torch.equal(dropout(x), first)


def test_guide_arguments_reach_the_loss(batch):
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05, guide_margin_strategy="absolute", guide_margin=0.05)
    generator = torch.Generator().manual_seed(3)
    guide = {"guide_query": torch.randn(BATCH, 16, generator=generator),
             "guide_passage": torch.randn(BATCH * GROUP, 16, generator=generator)}
    # Make query 0's first hard negative look like its positive to the guide, so the guide drops something.
    guide["guide_passage"][1] = guide["guide_query"][0] * 2
    cached_model = tiny_encoder(shared=True)
    reference_model = copy.deepcopy(cached_model)
    torch.manual_seed(5)
    cached_loss = GradCache(cached_model, loss_fn, 4, 5)(query, passage, **guide)
    torch.manual_seed(5)
    reference_loss = chunked_graph_step(reference_model, loss_fn, query, passage, 4, 5, **guide)
    torch.manual_seed(5)
    unguided = chunked_graph_step(copy.deepcopy(cached_model), ContrastiveLoss(temperature=0.05), query, passage, 4, 5)
    torch.testing.assert_close(cached_loss, reference_loss, atol=1e-6, rtol=1e-6)
    assert not torch.isclose(cached_loss, unguided)
    assert_same_gradients(cached_model, reference_model)


def test_grad_scaler_scales_the_cached_gradients(batch):
    """The loss is scaled before its backward, so every weight gradient carries the scale."""
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    scaled_model = tiny_encoder(shared=True)
    reference_model = copy.deepcopy(scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    torch.manual_seed(11)
    GradCache(scaled_model, loss_fn, 4, 5, scaler=scaler)(query, passage)
    torch.manual_seed(11)
    chunked_graph_step(reference_model, loss_fn, query, passage, 4, 5)
    reference = gradients(reference_model)
    for name, grad in gradients(scaled_model).items():
        torch.testing.assert_close(grad / 256.0, reference[name], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_is_close_to_fp32(batch):
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    bf16_model = tiny_encoder(shared=True)
    fp32_model = copy.deepcopy(bf16_model)
    torch.manual_seed(9)
    bf16_loss = GradCache(bf16_model, loss_fn, 4, 5, autocast_dtype=torch.bfloat16)(query, passage)
    torch.manual_seed(9)
    fp32_loss = GradCache(fp32_model, loss_fn, 4, 5)(query, passage)
    assert bf16_loss.dtype == torch.float32
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.02 * abs(fp32_loss.item())
    bf16_grads, fp32_grads = gradients(bf16_model), gradients(fp32_model)
    flat_bf16 = torch.cat([bf16_grads[name].flatten() for name in fp32_grads])
    flat_fp32 = torch.cat([fp32_grads[name].flatten() for name in fp32_grads])
    assert torch.isfinite(flat_bf16).all()
    assert torch.nn.functional.cosine_similarity(flat_bf16, flat_fp32, dim=0) > 0.98
    assert (flat_bf16 - flat_fp32).norm() < 0.2 * flat_fp32.norm()


@pytest.mark.parametrize("keep_last_graph", [True, False])
def test_one_autocast_region_per_step_changes_no_gradient(batch, monkeypatch, keep_last_graph):
    """Weight casts made once per step and shared by every chunk give bit-identical bf16 gradients to
    casts made afresh for every chunk (the losses and backwards stay in float32 either way)."""
    query, passage = batch
    loss_fn = ContrastiveLoss(temperature=0.05)
    assert gradcache.autocast_cache_survives_no_grad()  # the torch this project pins has the fix
    shared_region = tiny_encoder(shared=True)
    per_chunk = copy.deepcopy(shared_region)
    torch.manual_seed(5)
    loss = GradCache(shared_region, loss_fn, 4, 5, torch.bfloat16, keep_last_graph=keep_last_graph)(query, passage)
    monkeypatch.setattr(gradcache, "autocast_cache_survives_no_grad", lambda: False)
    torch.manual_seed(5)
    reference = GradCache(per_chunk, loss_fn, 4, 5, torch.bfloat16, keep_last_graph=keep_last_graph)(query, passage)
    assert torch.equal(loss, reference)
    grads, expected = gradients(shared_region), gradients(per_chunk)
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name


def test_the_autocast_probe_draws_no_random_numbers():
    gradcache.autocast_cache_survives_no_grad.cache_clear()
    state = torch.get_rng_state()
    gradcache.autocast_cache_survives_no_grad()
    assert torch.equal(state, torch.get_rng_state())


def test_a_tower_the_loss_ignores_gets_zero_gradients(batch):
    query, passage = batch
    model = tiny_encoder(shared=False)
    GradCache(model, lambda q, p: q[:, 0].sum(), 4, 5)(query, passage)
    grads = gradients(model)
    assert all(g.abs().sum() > 0 for name, g in grads.items() if name.startswith("query_model."))
    assert all(torch.all(g == 0) for name, g in grads.items() if name.startswith("passage_model."))


def test_split_inputs_keeps_rows_together():
    batch = {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)}
    chunks = split_inputs(batch, 2)
    assert [c["input_ids"].size(0) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), batch["input_ids"])
    with pytest.raises(ValueError, match="leading dimension"):
        split_inputs({"input_ids": torch.zeros(3, 2), "attention_mask": torch.zeros(4, 2)}, 2)
    with pytest.raises(ValueError, match="non-empty"):
        split_inputs({"input_ids": torch.zeros(0, 2)}, 2)
    with pytest.raises(ValueError, match="chunk sizes"):
        GradCache(torch.nn.Identity(), lambda q, p: q.sum(), 0, 2)
