"""PassageRetriever: dense, BM25 and hybrid passages of one index version, checked against independent
computations (brute-force inner products, the BM25 run ``ragkit mine`` wrote, fusion of the run files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexing_data import brute_force, build_indexed, corpus, invoke, direct_passage_vectors, direct_query_vectors, write_tiny_model
from ragkit.errors import RagkitError
from ragkit.indexing.fusion import linear_fusion
from ragkit.indexing.retrieval import PassageRetriever
from ragkit.runs import iter_trec, Run

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return build_indexed(tmp_path_factory.mktemp("retrieval"))


def dev_questions() -> list[dict]:
    return corpus()[1]["dev"]


def test_dense_passages_are_the_brute_force_top_k_with_their_texts_and_vectors(data):
    retriever = PassageRetriever.open(data["index"], device="cpu", precision="fp32")
    passages = corpus()[0]
    questions = [q["question"] for q in dev_questions()]
    found = retriever.retrieve(questions, k=4)
    rows, scores = brute_force(direct_query_vectors(data["model"], questions), direct_passage_vectors(data["model"], passages), 4)
    for question, result, expected_rows, expected_scores in zip(questions, found, rows, scores):
        assert result.passage_ids == [passages[r]["id"] for r in expected_rows]
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-4, atol=1e-5)
        assert result.texts == [passages[r]["text"] for r in expected_rows]
        assert result.titles == [passages[r]["title"] for r in expected_rows]
        query = direct_query_vectors(data["model"], [question])[0]
        np.testing.assert_allclose(retriever.passage_vectors(result.rows) @ query, expected_scores, rtol=1e-4, atol=1e-5)


def test_bm25_passages_are_the_mined_run(data):
    retriever = PassageRetriever.open(data["index"], mode="bm25", mine=data["mine"], device="cpu")
    questions = dev_questions()
    found = retriever.retrieve([q["question"] for q in questions], k=3)
    run = {r.question_id: r for r in iter_trec(data["mine"] / "runs" / "dev.trec")}
    for question, result in zip(questions, found):
        assert result.passage_ids == run[question["id"]].passage_ids[:3]
        np.testing.assert_allclose(result.scores, run[question["id"]].scores[:3], rtol=1e-4)


def test_hybrid_passages_are_the_fusion_of_both_runs(data):
    alpha = 0.3
    retriever = PassageRetriever.open(data["index"], mode="hybrid", mine=data["mine"], alpha=alpha, device="cpu",
                                      precision="fp32")
    questions = dev_questions()
    found = retriever.retrieve([q["question"] for q in questions], k=3)
    dense = Run(rankings={r.question_id: r for r in iter_trec(data["index"] / "runs" / "dev.trec")})
    sparse = Run(rankings={r.question_id: r for r in iter_trec(data["mine"] / "runs" / "dev.trec")})
    fused = linear_fusion(dense, sparse, alpha, depth=3)
    for question, result in zip(questions, found):
        assert result.passage_ids == fused.rankings[question["id"]].passage_ids
        np.testing.assert_allclose(result.scores, fused.rankings[question["id"]].scores, rtol=1e-4, atol=1e-5)


def test_a_deleted_passage_is_never_returned_and_an_added_one_is(data, tmp_path):
    index = tmp_path / "index"
    invoke("index", "build", data["ingest"], "--model", data["model"], "--out", index, "--device", "cpu")
    (tmp_path / "add.jsonl").write_text(json.dumps({"id": "n1", "title": "title0", "text": "w0x0 w0x1 w0x2 ans0"}) + "\n")
    (tmp_path / "delete.txt").write_text("p0-0\n")
    invoke("index", "update", index, "--add", tmp_path / "add.jsonl", "--delete", tmp_path / "delete.txt")
    question = [q["question"] for q in corpus()[1]["dev"] if q["id"] == "q0"]
    for mode in ("dense", "bm25"):
        retriever = PassageRetriever.open(index, mode=mode, mine=data["mine"], device="cpu")
        ids = retriever.retrieve(question, k=len(retriever))[0].passage_ids
        assert "p0-0" not in ids and len(ids) == len(set(ids))
        assert ("n1" in ids) == (mode == "dense")  # BM25 knows only the ingest artifact's passages
    old = PassageRetriever.open(index, version="v0001", device="cpu")
    assert "p0-0" in old.retrieve(question, k=len(old))[0].passage_ids


def test_bad_requests_are_refused_in_one_line(data, tmp_path):
    retriever = PassageRetriever.open(data["index"], device="cpu")
    with pytest.raises(RagkitError, match="asked for 1000 passages per question, version v0001 holds 42"):
        retriever.retrieve(["which"], k=1000)
    with pytest.raises(RagkitError, match="needs a BM25 index"):
        PassageRetriever.open(data["index"], mode="bm25", device="cpu")
    with pytest.raises(RagkitError, match="needs alpha"):
        PassageRetriever.open(data["index"], mode="hybrid", mine=data["mine"], device="cpu")
    other = write_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(RagkitError, match="was built by another encoder"):
        PassageRetriever.open(data["index"], query_model=str(other), device="cpu")
