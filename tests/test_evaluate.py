import json
import math

import datasets
import pytest

from ragkit.artifacts import Manifest, artifact_input
from ragkit.config import EvaluateConfig
from ragkit.errors import RagkitError
from ragkit.evaluation import (
    PassageLookup,
    RetrievalMetrics,
    document_ranking,
    first_answer_rank,
    format_table,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    retrieval_metrics,
    run,
)
from ragkit.runs import Run, TrecWriter, iter_trec, read_trec, write_trec


def test_ndcg_with_graded_judgements_matches_hand_computation():
    grades = {"d1": 2, "d2": 1, "d4": 3, "d5": 0}
    # DCG = 2/log2(3) + 1/log2(5); ideal order d4, d1, d2: 3/1 + 2/log2(3) + 1/log2(4).
    assert ndcg_at_k(["d3", "d1", "d9", "d2"], grades, 10) == pytest.approx(0.3554359516, abs=1e-9)
    assert ndcg_at_k(["d4", "d1", "d2"], grades, 10) == pytest.approx(1.0)
    # The cut-off applies to the ranking and to the ideal list alike.
    assert ndcg_at_k(["d3", "d1", "d4"], grades, 2) == pytest.approx((2 / math.log2(3)) / (3 + 2 / math.log2(3)))
    with pytest.raises(ValueError):
        ndcg_at_k(["d1"], {"d1": 0}, 10)


def test_reciprocal_rank_recall_and_document_ranking():
    assert reciprocal_rank(["p5", "p2", "p7"], {"p7", "p9"}, 10) == pytest.approx(1 / 3)
    assert reciprocal_rank(["p5", "p2", "p7"], {"p7"}, 2) == 0.0
    assert recall_at_k(["p5", "p2", "p7"], {"p7", "p9"}, 3) == 0.5
    assert recall_at_k(["p5", "p2", "p7"], {"p7", "p9"}, 2) == 0.0
    assert document_ranking(["d1", "d2", "d1", "d3", "d2"]) == ["d1", "d2", "d3"]


def test_first_answer_rank_is_token_level():
    texts = ["a party was held", "the art of war", "arts and crafts"]
    assert first_answer_rank(["art"], texts) == 2  # "party" does not contain the token "art"
    assert first_answer_rank(["U.S."], ["in the u . s . army"]) == 1
    assert first_answer_rank(["nothing"], texts) is None


def test_retrieval_metrics_hand_computed():
    texts = {"p1": "the capital is paris", "p2": "lyon is a city", "p3": "paris again", "p4": "nothing here"}
    docs = {"p1": "A", "p2": "B", "p3": "A", "p4": "C"}
    questions = [
        # answer first found at rank 3; gold p3 at rank 3; judged A=1, C=2 -> document ranking B, A, C.
        {"answers": ["paris"], "positive_ids": ["p3"], "doc_ids": ["A", "C"], "doc_scores": [1, 2]},
        # no answer retrieved; gold p4 at rank 1 and p2 missing; A judged non-relevant only.
        {"answers": ["tokyo"], "positive_ids": ["p4", "p2"], "doc_ids": ["A"], "doc_scores": [0]},
        # BEIR-like: no answers, no gold passages, one judged document at rank 1.
        {"answers": [], "positive_ids": [], "doc_ids": ["C"], "doc_scores": [1]},
    ]
    rankings = [["p2", "p4", "p3"], ["p4", "p1"], ["p4", "p3"]]
    m = retrieval_metrics(questions, rankings, texts.__getitem__, docs.__getitem__, ks=(1, 2, 3))
    assert m["questions"] == 3 and m["questions_with_answers"] == 2
    assert m["questions_with_positives"] == 2 and m["questions_with_judgments"] == 2
    assert m["accuracy@1"] == 0.0 and m["accuracy@2"] == 0.0 and m["accuracy@3"] == 0.5
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["recall@3"] == pytest.approx((1 + 0.5) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1) / 2)
    # Question 1: docs B, C, A (p2, p4, p3); gains 0, 2, 1; ideal 2, 1.
    ndcg_1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_1 + 1.0) / 2)
    assert m["doc_recall@100"] == pytest.approx(1.0)


def test_metric_families_are_absent_without_their_questions():
    metrics = RetrievalMetrics((1, 5))
    metrics.add(["p1"], has_answers=False, ranked_doc_ids=["d1"], doc_ids=["d1"], doc_scores=[1])
    out = metrics.result()
    assert out["ndcg@10"] == 1.0
    assert not any(k.startswith(("accuracy@", "recall@", "mrr@")) for k in out)


def test_trec_round_trip_and_ordering(tmp_path):
    path = tmp_path / "run.trec"
    run_ = Run(tag="bm25")
    run_.add("q1", ["p1", "p2"], [2.5, 1.0])
    run_.add("q2", [], [])
    run_.add("q3", ["p9"], [0.25])
    write_trec(path, run_)
    back = read_trec(path)
    assert back.tag == "bm25"
    assert list(back.rankings) == ["q1", "q3"]  # a question without results has no lines
    assert back["q1"].passage_ids == ["p1", "p2"] and back["q1"].scores == [2.5, 1.0]
    # Lines are ordered by score, then rank, whatever their order in the file.
    path.write_text("q1 Q0 a 1 1.0 t\nq1 Q0 b 2 3.0 t\nq1 Q0 c 3 1.0 t\n")
    assert [r.passage_ids for r in iter_trec(path)] == [["b", "a", "c"]]


@pytest.mark.parametrize(
    "text,message",
    [
        ("q1 Q0 p1 1 2.0\n", r"run.trec:1: expected 6 fields"),
        ("q1 Q0 p1 1 2.0 t\nq1 Q0 p2 x 1.0 t\n", r"run.trec:2: rank 'x' must be an integer"),
        ("q1 Q0 p1 1 2.0 t\nq2 Q0 p1 1 2.0 t\nq1 Q0 p2 2 1.0 t\n", r"run.trec:3: question 'q1' appears again"),
        ("q1 Q0 p1 1 2.0 t\nq1 Q0 p1 2 1.0 t\n", r"run.trec:\d: passage 'p1' is listed twice"),
    ],
)
def test_bad_trec_lines_are_refused_with_their_line(tmp_path, text, message):
    path = tmp_path / "run.trec"
    path.write_text(text)
    with pytest.raises(RagkitError, match=message):
        list(iter_trec(path))


def test_trec_writer_refuses_ids_with_spaces(tmp_path):
    with TrecWriter(tmp_path / "r.trec") as writer, pytest.raises(RagkitError, match="white space"):
        writer.write("q 1", ["p1"], [1.0])


def make_ingest(root, passages, questions):
    """A minimal ingest artifact (the layout docs/ARCHITECTURE.md specifies), built by hand."""
    root.mkdir()
    datasets.Dataset.from_list(passages).save_to_disk(str(root / "passages"))
    for split, rows in questions.items():
        datasets.Dataset.from_list(rows).save_to_disk(str(root / "questions" / split))
    Manifest(stage="ingest", counts={"passages": len(passages)}).save(root)
    return root


def make_run_artifact(root, ingest, runs, stage="mine"):
    (root / "runs").mkdir(parents=True)
    for split, rankings in runs.items():
        with TrecWriter(root / "runs" / f"{split}.trec") as writer:
            for qid, pids in rankings.items():
                writer.write(qid, pids, [float(len(pids) - i) for i in range(len(pids))])
    Manifest(stage=stage, inputs=[artifact_input(ingest)]).save(root)
    return root


def question(qid, answers=(), positives=(), docs=(), grades=()):
    return {"id": qid, "question": f"question {qid}", "answers": list(answers), "positive_ids": list(positives),
            "hard_negative_ids": [], "doc_ids": list(docs), "doc_scores": list(grades)}


@pytest.fixture
def small_ingest(tmp_path):
    passages = [
        {"id": "A#0", "title": "A", "text": "the capital of france is paris", "doc_id": "A"},
        {"id": "A#1", "title": "A", "text": "more about the city", "doc_id": "A"},
        {"id": "B", "title": "B", "text": "berlin is in germany", "doc_id": "B"},
    ]
    questions = {
        "test": [
            question("q1", ["paris"], ["A#0"], ["A"], [2]),
            question("q2", ["berlin"], [], ["B"], [1]),
            question("q3", ["rome"], ["B"], [], []),
        ]
    }
    return make_ingest(tmp_path / "ingest", passages, questions)


def test_evaluate_stage_writes_metrics(tmp_path, small_ingest, capsys):
    # q1 finds its gold passage second; q2 finds its answer first; q3 is missing from the run.
    source = make_run_artifact(tmp_path / "mine", small_ingest, {"test": {"q1": ["A#1", "A#0"], "q2": ["B", "A#0"]}})
    manifest = run(EvaluateConfig(artifact=str(source), out=str(tmp_path / "eval"), ks=[1, 2]))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert manifest.stage == "evaluate" and manifest.metrics["test"] == metrics
    assert metrics["questions"] == 3 and metrics["questions_without_results"] == 1
    assert metrics["accuracy@1"] == pytest.approx(1 / 3) and metrics["accuracy@2"] == pytest.approx(2 / 3)
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == pytest.approx(0.5)
    assert metrics["mrr@10"] == pytest.approx(0.25)
    # q1's document A is ranked first through its passage A#1; q2's B first: nDCG 1 for both.
    assert metrics["ndcg@10"] == pytest.approx(1.0) and metrics["questions_with_judgments"] == 2
    table = format_table({"test": metrics})
    assert "top1" in table.splitlines()[0] and "0.3333" in table.splitlines()[1]


def test_evaluate_refuses_artifacts_without_runs_and_unknown_ids(tmp_path, small_ingest):
    with pytest.raises(RagkitError, match=r"is a stage 'ingest' artifact with no runs/ folder"):
        run(EvaluateConfig(artifact=str(small_ingest), out=str(tmp_path / "eval")))
    source = make_run_artifact(tmp_path / "mine", small_ingest, {"test": {"q1": ["Z"]}})
    with pytest.raises(RagkitError, match=r"passage 'Z' is not in"):
        run(EvaluateConfig(artifact=str(source), out=str(tmp_path / "eval")))
    assert not (tmp_path / "eval").exists()
    other = make_run_artifact(tmp_path / "other", small_ingest, {"test": {"q9": ["B"]}})
    with pytest.raises(RagkitError, match=r"question 'q9' is not in the ingest questions"):
        run(EvaluateConfig(artifact=str(other), out=str(tmp_path / "eval")))
    with pytest.raises(RagkitError, match=r"has no run for split 'dev'"):
        run(EvaluateConfig(artifact=str(other), out=str(tmp_path / "eval"), splits=["dev"]))


def test_passage_lookup_reads_by_row_and_id(small_ingest):
    lookup = PassageLookup.open(small_ingest)
    assert len(lookup) == 3
    assert lookup.rows(["B", "A#0"]) == [2, 0]
    assert lookup.texts_at([2]) == ["berlin is in germany"] and lookup.doc_ids_at([1, 0]) == ["A", "A"]
    assert lookup.text("A#1") == "more about the city" and lookup.doc_id("B") == "B"
    with pytest.raises(RagkitError, match="'nope' is not in"):
        lookup.rows(["nope"])


def test_several_runs_side_by_side(tmp_path, small_ingest):
    from ragkit.comparison import TopKCurves
    from ragkit.evaluation import format_comparison

    first = make_run_artifact(tmp_path / "mine", small_ingest, {"test": {"q1": ["A#1", "A#0"], "q2": ["B", "A#0"]}})
    second = make_run_artifact(tmp_path / "index", small_ingest, {"test": {"q1": ["A#0"], "q2": ["A#0", "B"], "q3": ["B"]}},
                               stage="index")
    loose = tmp_path / "loose" / "test.trec"
    loose.parent.mkdir()
    loose.write_text((second / "runs" / "test.trec").read_text())
    out = tmp_path / "eval"
    manifest = run(EvaluateConfig(runs=[str(first), f"dense={second}", f"file={loose}"], out=str(out), ks=[1, 2]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["mine", "dense", "file"] and manifest.metrics == metrics
    single = run(EvaluateConfig(artifact=str(first), out=str(tmp_path / "single"), ks=[1, 2])).metrics
    assert metrics["mine"] == single  # the one-run layout is split -> metrics, the same numbers
    dense = metrics["dense"]["test"]
    # q1: answer and gold A#0 at rank 1; q2: answer "berlin" (B) at rank 2; q3: gold B at rank 1, no "rome".
    assert dense["accuracy@1"] == pytest.approx(1 / 3) and dense["accuracy@2"] == pytest.approx(2 / 3)
    assert dense["recall@1"] == 1.0 and dense["mrr@10"] == 1.0 and dense["questions_without_results"] == 0
    assert metrics["file"] == metrics["dense"]
    assert {i.get("run") for i in manifest.inputs} == {"mine", "dense", "file", None}

    records = [json.loads(line) for line in (out / "per_question" / "mine.test.jsonl").read_text().splitlines()]
    q1, q3 = records[0], records[2]
    assert q1["id"] == "q1" and q1["answer_rank"] == 2 and q1["answer_hit@1"] is False and q1["answer_hit@2"] is True
    assert q1["gold_rank"] == 2 and q1["gold_ranks"] == [2] and q1["gold_hit@1"] is False
    assert q1["relevant_doc_ranks"] == [1] and q1["ndcg@10"] == 1.0  # document A ranks first through A#1
    assert q3 == {"id": "q3", "retrieved": 0, "answer_rank": None, "answer_hit@1": False, "answer_hit@2": False,
                  "gold_rank": None, "gold_ranks": [], "gold_passages": 1, "gold_hit@1": False, "gold_hit@2": False,
                  "recall@1": 0.0, "recall@2": 0.0, "mrr@10": 0.0}
    assert (out / "topk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "single" / "per_question" / "mine.test.jsonl").is_file()

    # The plotted curve equals top-k accuracy at the reported cut-offs.
    for name in metrics:
        curves = TopKCurves()
        for line in (out / "per_question" / f"{name}.test.jsonl").read_text().splitlines():
            curves.add(json.loads(line))
        label, values = curves.curve()
        assert label == "top-k accuracy" and len(values) == 100
        assert values[[0, 1]] == pytest.approx([metrics[name]["test"]["accuracy@1"], metrics[name]["test"]["accuracy@2"]])

    table = format_comparison(metrics).splitlines()
    assert table[0].split() == ["test", "(3", "questions)", "mine", "dense", "file"]
    assert table[1].split() == ["accuracy@1", "0.3333", "0.3333", "0.3333"]


def test_topk_curves_for_passage_and_document_recall():
    from ragkit.comparison import TopKCurves

    curves = TopKCurves(max_k=4)
    curves.add({"gold_ranks": [1, 3], "gold_passages": 2, "relevant_doc_ranks": [2], "relevant_docs": 1})
    curves.add({"gold_ranks": [], "gold_passages": 1, "relevant_doc_ranks": [5], "relevant_docs": 2})
    label, values = curves.curve()
    assert label == "passage recall@k" and values.tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5])
    curves.counts["gold"] = 0
    label, values = curves.curve()
    assert label == "document recall@k" and values.tolist() == pytest.approx([0.0, 0.5, 0.5, 0.5])


def test_several_runs_refusals(tmp_path, small_ingest):
    first = make_run_artifact(tmp_path / "a" / "mine", small_ingest, {"test": {"q1": ["B"]}})
    twin = make_run_artifact(tmp_path / "b" / "mine", small_ingest, {"test": {"q1": ["B"]}})
    out = str(tmp_path / "eval")
    with pytest.raises(RagkitError, match=r"two runs are named 'mine' \(name them apart: NAME=path\)"):
        run(EvaluateConfig(runs=[str(first), str(twin)], out=out))
    other = make_run_artifact(tmp_path / "other", make_ingest(tmp_path / "ingest2", [], {}), {"dev": {}})
    with pytest.raises(RagkitError, match=r"was made from ingest artifact .*ingest2.*compare runs of one ingest artifact"):
        run(EvaluateConfig(runs=[str(first), str(other)], out=out))
    with pytest.raises(RagkitError, match=r"the runs share no split"):
        run(EvaluateConfig(runs=[str(first), str(other)], out=out, ingest=str(small_ingest)))
    loose = tmp_path / "bm25-run.trec"
    loose.write_text("q1 Q0 B 1 1.0 t\n")
    with pytest.raises(RagkitError, match=r"cannot tell which split this run file covers"):
        run(EvaluateConfig(runs=[str(first), f"x={loose}"], out=out))
    manifest = run(EvaluateConfig(runs=[str(first), f"x={loose}"], out=out, splits=["test"]))
    assert list(manifest.metrics) == ["mine", "x"]
    with pytest.raises(RagkitError, match=r"run name 'a b' may hold only"):
        run(EvaluateConfig(runs=[f"a b={loose}"], out=out, ingest=str(small_ingest), splits=["test"], overwrite=True))
