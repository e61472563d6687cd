"""Two gloo processes, each with half of the global batch (and of its passage labels), give the loss and
gradients of one process on all of it."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertModel

from gloo import spawn_and_collect

from ragkit.errors import RagkitError
from ragkit.retriever.distributed import (
    cleanup_distributed,
    gather_no_grad,
    gather_with_grad,
    global_loss,
    init_distributed,
    main_process_logger,
    shard_batch,
)
from ragkit.retriever.encoder import BiEncoder
from ragkit.retriever.gradcache import GradCache, full_batch_step
from ragkit.retriever.losses import ContrastiveLoss

WORLD = 2
BATCH, GROUP = 6, 3  # global batch: 6 queries with a positive and 2 hard negatives each
LOCAL_BATCH = BATCH // WORLD
CHUNKS = (2, 4)  # cached step: neither divides the local 3 queries / 9 passages
VOCAB = 40
SCENARIOS = [(shared, cached) for shared in (True, False) for cached in (False, True)]


def scenario_id(shared: bool, cached: bool) -> str:
    return f"{'shared' if shared else 'separate'}-{'cached' if cached else 'plain'}"


def tiny_encoder(shared: bool) -> BiEncoder:
    def bert(seed):
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
        return BertModel(config, add_pooling_layer=False)

    return BiEncoder(bert(0), None if shared else bert(1), pooling="mean", normalize=True).train()


def global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)

    def tokens(rows, length):
        input_ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
        lengths = torch.randint(2, length + 1, (rows,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids * mask, "attention_mask": mask}

    return tokens(BATCH, 7), tokens(BATCH * GROUP, 11)


def global_labels() -> dict[str, torch.Tensor]:
    """Corpus rows that cross the ranks: query 3 (rank 1) has query 0's (rank 0) positive, and a hard
    negative of query 4 (rank 1) is known to be relevant to query 0."""
    rows = torch.arange(BATCH * GROUP)
    rows[3 * GROUP] = rows[0]
    known = torch.full((BATCH, 2), -1)
    known[:, 0] = rows[::GROUP]
    known[0, 1] = rows[4 * GROUP + 1]
    return {"passage_rows": rows, "known_rows": known}


def loss_fn() -> ContrastiveLoss:
    return ContrastiveLoss(temperature=0.05, directions=("query_to_passage", "passage_to_query"))


def dropout_seed(rank: int) -> int:
    return 100 + rank


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed()
    try:
        # Each DDP wrapper lives inside _run_steps, so it is freed before the group (see cleanup_distributed).
        _run_steps(rank, out_dir)
        _run_collectives(info, out_dir)
    finally:
        cleanup_distributed()


def _run_steps(rank: int, out_dir: str) -> None:
    query, passage = global_batch()
    local_query, local_passage = shard_batch(query, rank, WORLD), shard_batch(passage, rank, WORLD)
    local_labels = shard_batch(global_labels(), rank, WORLD)  # (b * G,) rows, (b, K) known rows
    for shared, cached in SCENARIOS:
        model = DistributedDataParallel(tiny_encoder(shared))
        loss = global_loss(loss_fn())
        torch.manual_seed(dropout_seed(rank))
        if cached:
            value = GradCache(model, loss, *CHUNKS)(local_query, local_passage, **local_labels)
        else:
            value = full_batch_step(model, loss, local_query, local_passage, **local_labels)
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save({"loss": value, "grads": grads}, os.path.join(out_dir, f"{scenario_id(shared, cached)}-{rank}.pt"))

    refused = []
    model = DistributedDataParallel(tiny_encoder(shared=False), find_unused_parameters=True)
    steps = (lambda: GradCache(model, loss_fn(), *CHUNKS),
             lambda: full_batch_step(model, loss_fn(), local_query, local_passage))
    for step in steps:
        try:
            step()
        except ValueError as error:
            refused.append("find_unused_parameters=False" in str(error))
    torch.save({"refused": refused}, os.path.join(out_dir, f"find-unused-{rank}.pt"))


def _run_collectives(info, out_dir: str) -> None:
    rows = torch.full((2, 3), float(info.rank), requires_grad=True)
    gathered = gather_with_grad(rows)  # (4, 3)
    (gathered * torch.arange(4.0)[:, None]).sum().backward()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = main_process_logger("ragkit.test_distributed")
    logger.addHandler(handler)
    logger.warning("once")
    logger.removeHandler(handler)
    torch.save(
        {"info": (info.rank, info.world_size, info.local_rank, info.is_main, str(info.device)),
         "gathered": gathered.detach(), "gather_grad": rows.grad,
         "gather_no_grad": gather_no_grad(rows), "log_records": len(records)},
        os.path.join(out_dir, f"collectives-{info.rank}.pt"),
    )



@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    return spawn_and_collect(_worker, WORLD, out_dir)


def single_process_reference(shared: bool, cached: bool):
    """One process, no DDP, the whole global batch in one graph. Each rank's rows are encoded under that rank's
    seed and chunking, so the dropout masks match the two-process run."""
    model = tiny_encoder(shared)
    query, passage = global_batch()
    query_chunk, passage_chunk = CHUNKS if cached else (LOCAL_BATCH, LOCAL_BATCH * GROUP)
    query_reps, passage_reps = [], []
    for rank in range(WORLD):
        torch.manual_seed(dropout_seed(rank))
        q_rows = range(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        p_rows = range(rank * LOCAL_BATCH * GROUP, (rank + 1) * LOCAL_BATCH * GROUP)
        for start in range(q_rows.start, q_rows.stop, query_chunk):
            rows = slice(start, min(start + query_chunk, q_rows.stop))
            query_reps.append(model(query["input_ids"][rows], query["attention_mask"][rows], tower="query"))
        for start in range(p_rows.start, p_rows.stop, passage_chunk):
            rows = slice(start, min(start + passage_chunk, p_rows.stop))
            passage_reps.append(model(passage["input_ids"][rows], passage["attention_mask"][rows], tower="passage"))
    loss = loss_fn()(torch.cat(query_reps), torch.cat(passage_reps), **global_labels())
    assert not torch.isclose(loss, loss_fn()(torch.cat(query_reps), torch.cat(passage_reps)))  # the labels count
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("shared,cached", SCENARIOS, ids=[scenario_id(*s) for s in SCENARIOS])
def test_two_ranks_equal_one_process_on_the_global_batch(results, shared, cached):
    reference_loss, reference_grads = single_process_reference(shared, cached)
    assert all(g is not None for g in reference_grads.values())
    for rank in range(WORLD):
        result = results[f"{scenario_id(shared, cached)}-{rank}"]
        torch.testing.assert_close(result["loss"], reference_loss, atol=1e-6, rtol=1e-5)
        for name, grad in reference_grads.items():
            assert result["grads"][name] is not None, f"rank {rank}: {name} has no gradient"
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_collectives_keep_rank_order_and_sum_gradients(results):
    for rank in range(WORLD):
        result = results[f"collectives-{rank}"]
        assert result["info"] == (rank, WORLD, rank, rank == 0, "cpu")
        expected = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None].expand(4, 3)
        assert torch.equal(result["gathered"], expected)
        assert torch.equal(result["gather_no_grad"], expected)
        # Both ranks back-propagate the same loss sum_i i * row_i: the gather's backward sums them.
        own = torch.arange(4.0)[2 * rank:2 * rank + 2, None].expand(2, 3)
        assert torch.equal(result["gather_grad"], WORLD * own)
        assert result["log_records"] == (1 if rank == 0 else 0)


def test_separate_towers_with_find_unused_parameters_are_refused(results):
    for rank in range(WORLD):
        assert results[f"find-unused-{rank}"]["refused"] == [True, True]


def test_shard_batch_gives_each_rank_contiguous_rows():
    queries = torch.arange(6)
    passages = torch.arange(18)
    assert shard_batch(queries, 1, 2).tolist() == [3, 4, 5]
    assert shard_batch(passages, 1, 2).tolist() == list(range(9, 18))  # exactly queries 3..5's groups
    assert shard_batch(["a", "b", "c", "d"], 0, 2) == ["a", "b"]
    batch = shard_batch({"input_ids": torch.zeros(4, 2), "attention_mask": torch.ones(4, 2)}, 1, 2)
    assert batch["input_ids"].shape == (2, 2)
    with pytest.raises(RagkitError, match="multiple of 4"):
        shard_batch(queries, 0, 4)


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    reps = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(reps) is reps
    assert not gather_no_grad(reps).requires_grad
    loss = ContrastiveLoss()
    assert global_loss(loss) is loss


def test_torchrun_env_without_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RagkitError, match="torchrun"):
        init_distributed()
