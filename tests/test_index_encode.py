"""Encoding: equal to the encoder's own forward, in row order; precision; shards, crashes, resume, torchrun."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ragkit.config import IndexConfig
from ragkit.errors import RagkitError
from ragkit.evaluation import PassageLookup
from ragkit.indexing import encode as encode_module
from ragkit.indexing import stage as stage_module
from ragkit.indexing.encode import (LookupPassages, PassageTexts, encode_passages, encode_queries, open_embeddings,
                                    read_ids, resolve_precision)
from ragkit.indexing.versions import IndexVersion
from ragkit.retriever.encoder import BiEncoder, load_tokenizer

from gloo import spawn_and_collect
from indexing_data import corpus, direct_passage_vectors, direct_query_vectors, write_ingest, write_tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encode")
    return {"ingest": write_ingest(root), "model": write_tiny_model(root / "tiny"), "other": write_tiny_model(root / "other", seed=1)}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_passages_equal_the_encoders_forward_in_row_order(data, tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "BLOCK_ROWS", 10)  # several length-sorted blocks
    passages, _ = corpus()
    model, tokenizer = BiEncoder.from_pretrained(str(data["model"])), load_tokenizer(str(data["model"]))
    model.train()
    out = encode_passages(model, tokenizer, LookupPassages(PassageLookup.open(data["ingest"])), tmp_path / "all", 128,
                          batch_size=4)
    assert model.training  # the caller's mode is restored
    vectors = open_embeddings(out)
    assert vectors.shape == (len(passages), 32) and vectors.dtype == np.float32
    assert read_ids(out) == [p["id"] for p in passages]
    np.testing.assert_allclose(vectors, direct_passage_vectors(data["model"], passages), atol=2e-6)
    part = encode_passages(model, tokenizer, PassageTexts([p["id"] for p in passages], [p["title"] for p in passages],
                                                          [p["text"] for p in passages]),
                           tmp_path / "part", 128, start=5, stop=17, batch_size=3)
    assert read_ids(part) == [p["id"] for p in passages[5:17]]
    np.testing.assert_allclose(open_embeddings(part), vectors[5:17], atol=2e-6)


def test_queries_equal_the_encoders_forward(data):
    _, splits = corpus()
    questions = [q["question"] for q in splits["train"]] + ["which"]
    model, tokenizer = BiEncoder.from_pretrained(str(data["model"])), load_tokenizer(str(data["model"]))
    vectors = encode_queries(model, tokenizer, questions, 32, batch_size=3)
    np.testing.assert_allclose(vectors, direct_query_vectors(data["model"], questions), atol=2e-6)


def test_bf16_and_float16_storage_stay_close(data, tmp_path):
    passages, _ = corpus()
    model, tokenizer = BiEncoder.from_pretrained(str(data["model"])), load_tokenizer(str(data["model"]))
    source = LookupPassages(PassageLookup.open(data["ingest"]))
    half = encode_passages(model, tokenizer, source, tmp_path / "bf16", 128, autocast_dtype=torch.bfloat16, dtype="float16")
    vectors = open_embeddings(half)
    assert vectors.dtype == np.float16
    assert cosine(vectors.astype(np.float32), direct_passage_vectors(data["model"], passages)).min() > 0.99


def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(encode_module, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(encode_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(RagkitError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


# --- shards, crashes and resume ----------------------------------------------------------------------


def build(data, out: Path, **overrides) -> IndexConfig:
    settings = dict(ingest=str(data["ingest"]), out=str(out), model=str(data["model"]), precision="fp32", device="cpu",
                    batch_size=4, splits=[])
    settings.update(overrides)
    return IndexConfig(**settings)


def final_vectors(out: Path) -> tuple[np.ndarray, list[str]]:
    version = IndexVersion.open(out)
    return np.asarray(version.embeddings()[:]), version.ids()


def test_a_crashed_run_resumes_from_its_finished_shards(data, tmp_path, monkeypatch):
    passages, _ = corpus()
    calls, crash = [], {"on_call": 2}
    real = stage_module.encode_passages

    def crash_on_second(*args, **kwargs):
        calls.append(kwargs["start"])
        if len(calls) == crash["on_call"]:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_module, "encode_passages", crash_on_second)
    out = tmp_path / "index"
    with pytest.raises(RuntimeError, match="power cut"):
        stage_module.run(build(data, out, shards=3))
    shards = tmp_path / ".index.work" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["00000-of-00003", "plan.json"]  # the crashed shard left nothing
    assert not out.exists()
    calls.clear()
    crash["on_call"] = None
    manifest = stage_module.run(build(data, out))  # adopts the 3 shards in progress
    assert calls == [14, 28] and manifest.counts["passages_encoded"] == 28 and manifest.counts["shards"] == 3
    vectors, ids = final_vectors(out)
    assert ids == [p["id"] for p in passages]
    np.testing.assert_allclose(vectors, direct_passage_vectors(data["model"], passages), atol=2e-6)
    assert not (tmp_path / ".index.work").exists()


def test_shards_encoded_separately_then_merged(data, tmp_path):
    passages, _ = corpus()
    out = tmp_path / "index"
    for i in (2, 0, 1):
        assert stage_module.run(build(data, out, shard=f"{i}/3")) is None
    assert not out.exists()
    with pytest.raises(RagkitError, match=r"splits into 3 shards but shards=4"):
        build(data, out, shard="0/3", shards=4)
    with pytest.raises(RagkitError, match=r"holds shards of another encoding \(shards differ\)"):
        stage_module.run(build(data, out, shard="0/4"))
    with pytest.raises(RagkitError, match=r"holds shards of another encoding \(passage_fingerprint differ\)"):
        stage_module.run(build(data, out, model=str(data["other"])))
    manifest = stage_module.run(build(data, out))
    assert manifest.counts["passages_encoded"] == 0
    vectors, ids = final_vectors(out)
    assert ids == [p["id"] for p in passages]
    np.testing.assert_allclose(vectors, direct_passage_vectors(data["model"], passages), atol=2e-6)


def test_overwrite_discards_shards_of_another_encoding(data, tmp_path):
    out = tmp_path / "index"
    stage_module.run(build(data, out, shard="1/2"))
    manifest = stage_module.run(build(data, out, model=str(data["other"]), overwrite=True))
    assert manifest.counts["passages_encoded"] == len(corpus()[0]) and manifest.counts["shards"] == 1


def _torchrun_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    root = Path(out_dir)
    cfg = IndexConfig(ingest=str(root / "ingest"), out=str(root / "index"), model=str(root / "tiny"),
                      precision="fp32", device="cpu", batch_size=4, shards=4)
    manifest = stage_module.run(cfg)
    torch.save({"returned": manifest is not None, "encoded": manifest.counts["passages_encoded"] if manifest else None},
               root / f"rank{rank}.pt")


def test_under_torchrun_each_process_encodes_its_shards_and_the_first_merges(data, tmp_path):
    passages, _ = corpus()
    write_ingest(tmp_path)
    write_tiny_model(tmp_path / "tiny")
    results = spawn_and_collect(_torchrun_worker, 2, tmp_path)
    assert results["rank0"]["returned"] and not results["rank1"]["returned"]
    assert results["rank0"]["encoded"] == 10 + 10  # shards 0 and 2 of rows [0, 10), [10, 21), [21, 31), [31, 42)
    vectors, ids = final_vectors(tmp_path / "index")
    assert ids == [p["id"] for p in passages]
    np.testing.assert_allclose(vectors, direct_passage_vectors(data["model"], passages), atol=2e-6)
