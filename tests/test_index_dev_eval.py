"""The training loop's dev evaluation, which encodes and searches through ragkit.indexing, against brute force."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from ragkit.evaluation import PassageLookup, retrieval_metrics
from ragkit.retriever.encoder import BiEncoder, load_tokenizer, tokenize_passages, tokenize_queries
from ragkit.retriever.dev_evaluation import DevEvaluation

from indexing_data import brute_force, write_ingest, write_tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dev")
    return {"ingest": write_ingest(root), "model": write_tiny_model(root / "tiny")}


@pytest.mark.parametrize("max_passages, similarity, normalize", [(1000, "dot", True), (20, "dot", True), (1000, "cos", False)])
def test_dev_metrics_equal_brute_force_ranking(data, max_passages, similarity, normalize):
    lookup = PassageLookup.open(data["ingest"])
    questions = datasets.load_from_disk(str(data["ingest"] / "questions" / "dev"))
    dev = DevEvaluation(questions, lookup, None, max_passages=max_passages, seed=0, match_type="string")
    model = BiEncoder.from_pretrained(str(data["model"]), normalize=normalize)
    tokenizer = load_tokenizer(str(data["model"]))
    metrics = dev.evaluate(model, tokenizer, None, 8, 16, 24, similarity)

    rows = lookup.rows(dev.passage_ids)
    with torch.no_grad():
        passages = model(**tokenize_passages(tokenizer, lookup.titles_at(rows), lookup.texts_at(rows), 24), tower="passage")
        queries = model(**tokenize_queries(tokenizer, list(questions["question"]), 16), tower="query")
    if similarity == "cos":
        passages, queries = torch.nn.functional.normalize(passages, dim=-1), torch.nn.functional.normalize(queries, dim=-1)
    ranked, _ = brute_force(queries.numpy(), passages.numpy(), min(100, len(rows)))
    ids, texts, docs = lookup.ids_at(rows), lookup.texts_at(rows), lookup.doc_ids_at(rows)
    position = {pid: i for i, pid in enumerate(ids)}
    expected = retrieval_metrics(list(questions), [[ids[i] for i in row] for row in ranked],
                                 lambda pid: texts[position[pid]], lambda pid: docs[position[pid]])
    assert metrics["passages_searched"] == len(rows) == min(max_passages, len(lookup))
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
