"""The hybrid stage: alpha tuned on a split that is never reported, fused runs, refusals; the CLI end to end."""

import json
import math

import pytest
from test_evaluate import make_ingest, question
from typer.testing import CliRunner

import ragkit
from ragkit.artifacts import Manifest, artifact_input
from ragkit.cli import app
from ragkit.config import HybridConfig
from ragkit.errors import RagkitError
from ragkit.indexing import hybrid
from ragkit.indexing.hybrid import choose_alpha
from ragkit.runs import TrecWriter, read_trec

GRID = [0.0, 0.5, 1.0, 2.0]

# Every passage is its own document. Questions carry no answers, only judged documents, so the tune metric
# chosen automatically is nDCG@10.
PASSAGES = [{"id": p, "title": p, "text": f"passage {p}", "doc_id": p} for p in ("p1", "p2", "p3", "p4")]
QUESTIONS = {
    # t1 needs alpha > 0.7 to put p2 (relevant) above p1; t2 needs alpha < 1.5 to keep p3 above p4.
    # On train, alpha 1 alone gets both right.
    "train": [question("t1", docs=["p2"], grades=[1]), question("t2", docs=["p3"], grades=[1])],
    # d1 needs alpha < 0.4 to keep p1 above p2: on dev, alpha 0 would be best.
    "dev": [question("d1", docs=["p1"], grades=[1])],
}
DENSE_RUNS = {
    "train": {"t1": [("p1", 1.0), ("p2", 0.3)], "t2": [("p3", 1.5), ("p4", 0.0)]},
    "dev": {"d1": [("p1", 0.4), ("p2", 0.0)]},
}
BM25_RUNS = {
    "train": {"t1": [("p2", 1.0), ("p1", 0.0)], "t2": [("p4", 1.0), ("p3", 0.0)]},
    "dev": {"d1": [("p2", 1.0), ("p1", 0.0)]},
}
RANK2 = 1 / math.log2(3)  # nDCG@10 of one relevant document at rank 2


def scored_artifact(root, ingest, runs, stage):
    (root / "runs").mkdir(parents=True)
    for split, rankings in runs.items():
        with TrecWriter(root / "runs" / f"{split}.trec") as writer:
            for qid, pairs in rankings.items():
                writer.write(qid, [p for p, _ in pairs], [s for _, s in pairs])
    Manifest(stage=stage, inputs=[artifact_input(ingest)]).save(root)
    return root


@pytest.fixture
def artifacts(tmp_path):
    ingest = make_ingest(tmp_path / "ingest", PASSAGES, QUESTIONS)
    dense = scored_artifact(tmp_path / "dense", ingest, DENSE_RUNS, "index")
    bm25 = scored_artifact(tmp_path / "bm25", ingest, BM25_RUNS, "mine")
    return tmp_path, dense, bm25


def test_alpha_is_tuned_on_train_and_never_reads_the_reported_split(artifacts, monkeypatch):
    tmp_path, dense, bm25 = artifacts
    loaded = []
    load_questions = hybrid.load_questions
    monkeypatch.setattr(hybrid, "load_questions", lambda root, split: loaded.append(split) or load_questions(root, split))
    manifest = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "hybrid"), alpha_grid=GRID)
    assert loaded == ["train"]
    tuning = manifest.metrics["tuning"]
    assert manifest.metrics["alpha"] == 1.0 and manifest.metrics["alpha_chosen_by"] == "tuned"
    assert tuning["split"] == "train" and tuning["metric"] == "ndcg@10" and tuning["questions"] == 2
    # Per alpha (t1, t2): 0 -> (rank 2, rank 1), 0.5 -> same, 1 -> (1, 1; t2 ties at 1.0, dense rank wins),
    # 2 -> (1, rank 2).
    expected = [(1 + RANK2) / 2, (1 + RANK2) / 2, 1.0, (1 + RANK2) / 2]
    assert [a for a, _ in tuning["grid"]] == GRID
    assert [v for _, v in tuning["grid"]] == pytest.approx(expected)
    # Only dev is reported, fused with the train alpha: p2 = 0 + 1 * 1.0 above p1 = 0.4 + 1 * 0.
    assert manifest.counts["questions"] == {"dev": 1}
    fused = read_trec(tmp_path / "hybrid" / "runs" / "dev.trec")
    assert fused.tag == "ragkit-hybrid" and fused["d1"].passage_ids == ["p2", "p1"]
    assert fused["d1"].scores == pytest.approx([1.0, 0.4])
    assert not (tmp_path / "hybrid" / "runs" / "train.trec").exists()
    assert manifest.config["alpha_used"] == 1.0
    assert [i["stage"] for i in manifest.inputs] == ["index", "mine", "ingest"]

    # Evaluated side by side, the tuned hybrid loses to dense on dev, as an alpha picked there would not.
    evaluation = ragkit.evaluate([str(dense), str(bm25), str(tmp_path / "hybrid")], str(tmp_path / "eval"))
    ndcg = {name: m["dev"]["ndcg@10"] for name, m in evaluation.metrics.items()}
    assert ndcg == pytest.approx({"dense": 1.0, "bm25": RANK2, "hybrid": RANK2})


def test_validation_is_the_default_tune_split_when_both_have_it(tmp_path):
    questions = dict(QUESTIONS, validation=QUESTIONS["train"])
    ingest = make_ingest(tmp_path / "ingest", PASSAGES, questions)
    dense = scored_artifact(tmp_path / "dense", ingest, dict(DENSE_RUNS, validation=DENSE_RUNS["train"]), "index")
    bm25 = scored_artifact(tmp_path / "bm25", ingest, dict(BM25_RUNS, validation=BM25_RUNS["train"]), "mine")
    manifest = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "hybrid"), alpha_grid=GRID)
    assert manifest.metrics["tuning"]["split"] == "validation" and manifest.metrics["alpha"] == 1.0
    assert sorted(manifest.counts["questions"]) == ["dev", "train"]


def test_given_alpha_and_rrf_need_no_tune_split(artifacts):
    tmp_path, dense, bm25 = artifacts
    manifest = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "given"), alpha="0.2")
    assert manifest.metrics == {"method": "linear", "alpha": 0.2, "alpha_chosen_by": "given"}
    assert sorted(manifest.counts["questions"]) == ["dev", "train"]
    assert read_trec(tmp_path / "given" / "runs" / "dev.trec")["d1"].passage_ids == ["p1", "p2"]  # 0.4 > 0.2
    manifest = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "rrf"), method="rrf", splits=["dev"])
    assert manifest.metrics["alpha"] is None and "tuning" not in manifest.metrics
    scores = read_trec(tmp_path / "rrf" / "runs" / "dev.trec")["d1"].scores
    assert scores == pytest.approx([1 / 61 + 1 / 62] * 2, abs=1e-6)


def test_refusals_are_one_line_and_write_nothing(artifacts):
    tmp_path, dense, bm25 = artifacts
    out = tmp_path / "hybrid"
    with pytest.raises(RagkitError, match=r"split 'train' is the split alpha is tuned on"):
        ragkit.hybrid(str(dense), str(bm25), str(out), splits=["train"])
    with pytest.raises(RagkitError, match=r"has no run for split 'test'"):
        ragkit.hybrid(str(dense), str(bm25), str(out), alpha=1, splits=["test"])
    dev_only = scored_artifact(tmp_path / "dev-only", tmp_path / "ingest", {"dev": DENSE_RUNS["dev"]}, "index")
    with pytest.raises(RagkitError, match=r"dev-only: has no run for the tune split 'train' .*ragkit mine INGEST --split train.*--alpha"):
        ragkit.hybrid(str(dev_only), str(bm25), str(out))
    other_ingest = make_ingest(tmp_path / "ingest2", PASSAGES, QUESTIONS)
    other = scored_artifact(tmp_path / "other", other_ingest, BM25_RUNS, "mine")
    with pytest.raises(RagkitError, match=r"was made from ingest artifact .*ingest2.*fuse runs of one ingest artifact"):
        ragkit.hybrid(str(dense), str(other), str(out))
    with pytest.raises(RagkitError, match=r"was written by stage 'ingest'"):
        ragkit.hybrid(str(tmp_path / "ingest"), str(bm25), str(out))
    with pytest.raises(RagkitError, match=r"tune_metric='accuracy@20' cannot be computed"):
        ragkit.hybrid(str(dense), str(bm25), str(out), tune_metric="accuracy@20")
    assert not out.exists()
    with pytest.raises(RagkitError, match=r"weighs scores in linear fusion only"):
        HybridConfig(dense="a", bm25="b", method="rrf", alpha=0.5)
    with pytest.raises(RagkitError, match=r"alpha='big' must be a number"):
        HybridConfig(dense="a", bm25="b", alpha="big")


def test_choose_alpha_prefers_the_smallest_among_equals():
    assert choose_alpha([0.0, 0.5, 1.0, 2.0], [0.3, 0.7, 0.7, 0.1]) == 0.5
    assert choose_alpha([0.0, 0.5], [0.3, 0.2]) == 0.0


def test_tuning_sample_is_seeded_and_capped(artifacts):
    tmp_path, dense, bm25 = artifacts
    a = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "a"), alpha_grid=GRID, tune_max_questions=1, seed=3)
    b = ragkit.hybrid(str(dense), str(bm25), str(tmp_path / "b"), alpha_grid=GRID, tune_max_questions=1, seed=3)
    assert a.metrics["tuning"]["questions"] == 1 and a.metrics["tuning"]["of_questions"] == 2
    assert a.metrics["tuning"]["grid"] == b.metrics["tuning"]["grid"]


def test_cli_hybrid_then_evaluate_side_by_side(artifacts):
    tmp_path, dense, bm25 = artifacts
    runner = CliRunner()
    result = runner.invoke(app, ["hybrid", str(dense), str(bm25), "--out", str(tmp_path / "hybrid")])
    assert result.exit_code == 0, result.output
    assert "alpha = " in result.output and "tuned on train (2 of 2 questions): ndcg@10" in result.output
    result = runner.invoke(app, ["evaluate", f"BM25={bm25}", f"dense={dense}", f"hybrid={tmp_path / 'hybrid'}",
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ["dev", "(1", "questions)", "BM25", "dense", "hybrid"] in [line.split() for line in lines]
    assert next(line for line in lines if line.startswith("ndcg@10")).split()[1:3] == [f"{RANK2:.4f}", "1.0000"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["BM25", "dense", "hybrid"] and list(metrics["dense"]) == ["dev"]
    result = runner.invoke(app, ["hybrid", str(dense), str(bm25), "--out", str(tmp_path / "x"), "--split", "train"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error: split 'train'")


def test_grid_metrics_score_answers_of_each_alpha_ranking():
    import numpy as np

    from ragkit.indexing.fusion import candidates
    from ragkit.indexing.hybrid import JudgedCandidates, grid_metrics
    from ragkit.runs import Ranking

    # Only b holds the answer; a leads the dense run, b the BM25 run: b = 0 + alpha, a = 1 + 0.
    c = candidates(Ranking("q", ["a", "b"], [1.0, 0.0]), Ranking("q", ["b", "a"], [1.0, 0.0]), depth=100)
    item = JudgedCandidates({"answers": ["x"], "positive_ids": ["b"], "doc_ids": [], "doc_scores": []}, c,
                            np.array([p == "b" for p in c.passage_ids]), list(c.passage_ids))
    results = grid_metrics([item], [0.0, 0.5, 2.0], depth=100, ks=[1, 2])
    assert [r["accuracy@1"] for r in results] == [0.0, 0.0, 1.0]
    assert [r["mrr@10"] for r in results] == [0.5, 0.5, 1.0]
    assert all(r["accuracy@2"] == 1.0 for r in results)
