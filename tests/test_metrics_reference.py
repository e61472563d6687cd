"""ragkit's metrics against an independent implementation: pytrec_eval (trec_eval's C code).

trec_eval breaks score ties by document id where ragkit keeps the run's order, so the runs handed to
pytrec_eval carry rank-derived scores (one distinct score per rank): both then score the same ranking.
ragkit's document metrics rank a document where its best passage ranks; with whole documents as passages
(``--window 0``) that is the run itself, and with windows the test derives the document ranking itself.
"""

import json
import random
from pathlib import Path

import pytest
from test_evaluate import make_ingest, question

import ragkit
from ragkit.runs import TrecWriter, read_trec

pytrec_eval = pytest.importorskip("pytrec_eval")

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "scifact"


def rank_scores(ids):
    """A run for trec_eval in which the given order is the only order: score = -rank."""
    return {pid: float(-rank) for rank, pid in enumerate(ids, start=1)}


def per_question(path):
    return {r["id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def trec_eval(qrels, run, measures):
    return pytrec_eval.RelevanceEvaluator(qrels, set(measures)).evaluate(run)


@pytest.mark.slow
@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason="shared SciFact data not present")
def test_scifact_bm25_metrics_equal_trec_eval_per_question(tmp_path):
    ragkit.ingest([str(SCIFACT)], str(tmp_path / "ingest"), window=0, dev_fraction=0.2)
    ragkit.mine(str(tmp_path / "ingest"), str(tmp_path / "mine"), splits=["dev"], negatives=1)
    manifest = ragkit.evaluate(str(tmp_path / "mine"), str(tmp_path / "eval"))
    ours = per_question(tmp_path / "eval" / "per_question" / "mine.dev.jsonl")

    import datasets

    questions = datasets.load_from_disk(str(tmp_path / "ingest" / "questions" / "dev"))
    run = read_trec(tmp_path / "mine" / "runs" / "dev.trec")
    full = {r.question_id: rank_scores(r.passage_ids) for r in run}
    top10 = {r.question_id: rank_scores(r.passage_ids[:10]) for r in run}
    judged = {q["id"]: {d: int(g) for d, g in zip(q["doc_ids"], q["doc_scores"])} for q in questions}
    gold = {q["id"]: {p: 1 for p in q["positive_ids"]} for q in questions}
    docs = trec_eval(judged, full, {"ndcg_cut.10", "recall.100"})
    mrr = trec_eval(gold, top10, {"recip_rank"})  # MRR@10: reciprocal rank within the top 10

    assert len(docs) == len(mrr) == len(ours) == 162
    for qid, theirs in docs.items():
        assert ours[qid]["ndcg@10"] == pytest.approx(theirs["ndcg_cut_10"], abs=1e-6), qid
        assert ours[qid]["doc_recall@100"] == pytest.approx(theirs["recall_100"], abs=1e-6), qid
        assert ours[qid]["mrr@10"] == pytest.approx(mrr[qid]["recip_rank"], abs=1e-6), qid
    mean = sum(d["ndcg_cut_10"] for d in docs.values()) / len(docs)
    assert manifest.metrics["dev"]["ndcg@10"] == pytest.approx(mean, abs=1e-9)


def window_passages(rng, n_docs):
    passages = []
    for d in range(n_docs):
        for w in range(rng.randint(1, 4)):
            passages.append({"id": f"D{d}#{w}", "title": f"D{d}", "text": f"window {w} of document {d}", "doc_id": f"D{d}"})
    return passages


def test_windowed_runs_are_scored_at_document_level_like_trec_eval(tmp_path):
    rng = random.Random(11)
    passages = window_passages(rng, 25)
    doc_of = {p["id"]: p["doc_id"] for p in passages}
    all_docs = sorted(set(doc_of.values()))
    questions, rankings = [], {}
    # q0 by hand: passages B#1, A#2, B#0, C#0, A#0, D#0 rank documents B, A, C, D.
    hand = [
        {"id": "A#0", "title": "A", "text": "a", "doc_id": "A"}, {"id": "A#2", "title": "A", "text": "a", "doc_id": "A"},
        {"id": "B#0", "title": "B", "text": "b", "doc_id": "B"}, {"id": "B#1", "title": "B", "text": "b", "doc_id": "B"},
        {"id": "C#0", "title": "C", "text": "c", "doc_id": "C"}, {"id": "D#0", "title": "D", "text": "d", "doc_id": "D"},
    ]
    passages += hand
    questions.append(question("q0", docs=["A", "C", "E", "D"], grades=[2, 1, 3, 0]))
    rankings["q0"] = ["B#1", "A#2", "B#0", "C#0", "A#0", "D#0"]
    hand_docs = {"q0": ["B", "A", "C", "D"]}
    for i in range(1, 40):
        judged = rng.sample(all_docs, rng.randint(1, 6))
        questions.append(question(f"q{i}", docs=judged, grades=[rng.choice([0, 1, 2, 3]) for _ in judged]))
        rankings[f"q{i}"] = rng.sample([p["id"] for p in passages if "#" in p["id"] and p["id"][0] == "D"], rng.randint(1, 30))
    questions = [q for q in questions if any(g > 0 for g in q["doc_scores"])]
    ingest = make_ingest(tmp_path / "ingest", passages, {"test": questions})
    (tmp_path / "runs").mkdir()
    with TrecWriter(tmp_path / "runs" / "test.trec") as writer:
        for q in questions:
            ids = rankings[q["id"]]
            writer.write(q["id"], ids, [float(len(ids) - r) for r in range(len(ids))])
    ragkit.evaluate(f"windows={tmp_path / 'runs' / 'test.trec'}", str(tmp_path / "eval"), ingest=str(ingest))
    ours = per_question(tmp_path / "eval" / "per_question" / "windows.test.jsonl")

    doc_run = {}
    for q in questions:
        best: dict[str, int] = {}  # naive: each document's best passage rank
        for rank, pid in enumerate(rankings[q["id"]], start=1):
            doc = pid.split("#")[0]
            best[doc] = min(best.get(doc, rank), rank)
        doc_run[q["id"]] = rank_scores(sorted(best, key=best.get))
    assert list(doc_run["q0"]) == hand_docs["q0"]
    qrels = {q["id"]: {d: int(g) for d, g in zip(q["doc_ids"], q["doc_scores"])} for q in questions}
    theirs = trec_eval(qrels, doc_run, {"ndcg_cut.10", "recall.100"})
    assert len(theirs) == len(questions) > 20
    for qid, values in theirs.items():
        assert ours[qid]["ndcg@10"] == pytest.approx(values["ndcg_cut_10"], abs=1e-9), qid
        assert ours[qid]["doc_recall@100"] == pytest.approx(values["recall_100"], abs=1e-9), qid
    assert ours["q0"]["relevant_doc_ranks"] == [2, 3]  # A and C; E was not retrieved, D is graded 0
