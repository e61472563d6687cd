"""`ragkit index` end to end: CLI build, `ragkit evaluate` on its run, inputs, refusals, update and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ragkit
from ragkit.artifacts import Manifest
from ragkit.cli import app
from ragkit.evaluation import find_ingest, retrieval_metrics
from ragkit.runs import read_trec

from indexing_data import (brute_force, corpus, direct_passage_vectors, direct_query_vectors, write_ingest, write_mine,
                           write_retriever, write_tiny_model)

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage")
    ingest = write_ingest(root)
    mine = write_mine(root, ingest)
    model = write_tiny_model(root / "tiny")
    return {"root": root, "ingest": ingest, "mine": mine, "model": model, "retriever": write_retriever(root, model, mine)}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_cli_build_then_evaluate_scores_the_dense_run_like_brute_force(data, tmp_path):
    out = tmp_path / "index"
    invoke("index", data["ingest"], "--model", data["model"], "--out", out, "--precision", "fp32", "--device", "cpu",
           "--depth", "20")
    manifest = Manifest.load(out)
    assert manifest.stage == "index" and manifest.files["runs/dev"] == "runs/dev.trec"  # dev by default
    assert [item["stage"] for item in manifest.inputs] == ["ingest"] and find_ingest(manifest) == data["ingest"].resolve()
    run = read_trec(out / "runs" / "dev.trec")
    assert run.tag == "ragkit-dense" and all(len(ranking.passage_ids) == 20 for ranking in run)

    invoke("evaluate", out, "--out", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["dev"]

    passages, splits = corpus()
    questions = splits["dev"]
    rows, _ = brute_force(direct_query_vectors(data["model"], [q["question"] for q in questions]),
                          direct_passage_vectors(data["model"], passages), 20)
    text = {p["id"]: p["text"] for p in passages}
    doc = {p["id"]: p["doc_id"] for p in passages}
    expected = retrieval_metrics(questions, [[passages[r]["id"] for r in row] for row in rows], text.__getitem__,
                                 doc.__getitem__, ks=(1, 5, 20, 100))
    assert [ranking.passage_ids for ranking in run] == [[passages[r]["id"] for r in row] for row in rows]
    for name in ("accuracy@1", "accuracy@5", "recall@5", "mrr@10", "ndcg@10"):
        assert metrics[name] == pytest.approx(expected[name]), name


def test_a_trained_retriever_over_a_mine_artifact(data, tmp_path):
    out = tmp_path / "index"
    manifest = ragkit.index(data["mine"], out, model=data["retriever"], splits=["train", "dev"], precision="fp32",
                            device="cpu", depth=5)
    assert [item["stage"] for item in manifest.inputs] == ["train-retriever", "ingest"]
    encoder = manifest.config["encoder"]
    assert (encoder["pooling"], encoder["normalize"], encoder["query_max_length"], encoder["passage_max_length"]) == ("cls", False, 16, 24)
    assert encoder["query_fingerprint"] != encoder["passage_fingerprint"]  # two towers
    assert manifest.counts["questions"] == {"train": 9, "dev": 5}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["dev.trec", "train.trec"]


def test_wrong_inputs_and_an_existing_output_are_refused(data, tmp_path):
    cases = [
        (["index", data["ingest"], "--model", data["mine"], "--out", tmp_path / "x"],
         "was written by stage 'mine', this stage reads the output of stage 'train-retriever'"),
        (["index", data["retriever"], "--model", data["model"], "--out", tmp_path / "x"],
         "was written by stage 'train-retriever', this stage reads the output of stage 'ingest' or 'mine'"),
        (["index", data["ingest"], "--model", data["model"], "--split", "test", "--out", tmp_path / "x"],
         "has no 'test' split (splits: dev, train)"),
        (["index", data["ingest"], "--model", data["model"], "--factory", "IVF4,Nope", "--out", tmp_path / "x"],
         "index factory 'IVF4,Nope' is not one FAISS builds"),
        (["index", data["ingest"], "--model", data["model"], "--out", data["mine"]],
         "output directory exists and is not empty (pass --overwrite to replace it)"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.work").exists()


def test_cli_update_and_rollback(data, tmp_path):
    out = tmp_path / "index"
    invoke("index", "build", data["ingest"], "--model", data["model"], "--out", out, "--device", "cpu", "--factory", "HNSW8")
    (tmp_path / "add.jsonl").write_text(json.dumps({"id": "n1", "title": "t", "text": "w14x0 w14x1"}) + "\n")
    (tmp_path / "delete.txt").write_text("p0-0\np0-1\n")
    result = invoke("index", "update", out, "--add", tmp_path / "add.jsonl", "--delete", tmp_path / "delete.txt")
    assert "current version v0002 (passages=41, rows=43, added=1, replaced=0, deleted=2)" in result.output
    assert (out / "current").read_text() == "v0002\n"
    assert "current version v0001" in invoke("index", "rollback", out).output
    result = runner.invoke(app, ["index", "rollback", str(out), "--to", "v7"])
    assert result.exit_code == 2 and "has no version 'v7'" in result.output
