"""MS MARCO / TREC layouts: collection, queries, TREC qrels (also attached with --qrels), given negatives."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from ragkit import ingest, mine
from ragkit.cli import app
from ragkit.ingestion import detect_format


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows(out, split):
    return {row["id"]: row for row in datasets.load_from_disk(str(out / "questions" / split))}


LONG = " ".join(f"w{i}" for i in range(10))  # 10 words: windows of 4 -> 3


def collection(directory):
    return write(directory / "collection.tsv", [
        "0\tcommunication amid scientific minds",
        '1\ta "quoted" tab\there x',
        f"2\t{LONG}",
        "3\tcolds come from viruses",
        "4\tnothing relevant",
        "5\tanother one",
    ])


def msmarco_files(directory):
    return {
        "collection": collection(directory),
        "train": write(directory / "queries.train.tsv", ["100\twhat is the manhattan project", "101\twhat causes colds",
                                                         "102\tnever judged"]),
        "dev": write(directory / "queries.dev.small.tsv", ["200\tlong words"]),
        "qrels_train": write(directory / "qrels.train.tsv", ["100\t0\t1\t1", "101 0 3 1", "101 0 4 0"]),  # tabs or spaces
        "qrels_dev": write(directory / "qrels.dev.small.tsv", ["200 Q0 2 2", "200 Q0 0 1", "200 Q0 5 0"]),
    }


def test_detection_keeps_dpr_layouts_and_tells_msmarco_files_apart(tmp_path):
    files = msmarco_files(tmp_path)
    triples = write(tmp_path / "qidpidtriples.train.full.2.tsv", ["100\t1\t4"])
    top = write(tmp_path / "top1000.dev.tsv", ["200\t4\tlong words\tnothing relevant"])
    trec = write(tmp_path / "dl19.qrels", ["1 0 2 3"])
    psgs = write(tmp_path / "psgs_w100.tsv", ["id\ttext\ttitle", "1\tx\tt"])
    qas = write(tmp_path / "nq-test.qas.tsv", ["1984\t['Orwell']", "who\t[]"])
    unnamed = write(tmp_path / "lines.tsv", ["7\tsome text"])
    assert [detect_format(files[k]) for k in files] == [
        "msmarco-collection", "msmarco-queries", "msmarco-queries", "qrels", "qrels"]
    assert [detect_format(p) for p in (triples, top, trec, psgs, qas)] == [
        "msmarco-triples", "msmarco-top1000", "qrels", "dpr-passages", "dpr-qas"]
    assert detect_format(tmp_path) == "msmarco"
    assert detect_format(unnamed, split="test") == "msmarco-queries"
    assert detect_format(files["collection"], "msmarco") == "msmarco-collection"


def test_files_ids_splits_grades(tmp_path):
    files = msmarco_files(tmp_path)
    manifest = ingest([str(files[k]) for k in ("collection", "train", "dev", "qrels_train", "qrels_dev")],
                      str(tmp_path / "out"), window=4)
    passages = datasets.load_from_disk(str(tmp_path / "out" / "passages"))
    assert passages["id"] == ["0", "1#0", "1#1", "2#0", "2#1", "2#2", "3", "4", "5"]
    assert set(passages["title"]) == {""}
    assert passages["text"][:3] == ["communication amid scientific minds", 'a "quoted" tab\there', "x"]  # no tsv quoting
    assert manifest.counts["questions"] == {"train": 3, "dev": 1}
    assert manifest.counts["questions_without_positive"] == 1  # 102 is not judged
    train, dev = rows(tmp_path / "out", "train"), rows(tmp_path / "out", "dev")
    assert train["100"] == {"id": "100", "question": "what is the manhattan project", "answers": [],
                            "positive_ids": ["1#0", "1#1"], "hard_negative_ids": [], "doc_ids": ["1"], "doc_scores": [1]}
    assert (train["101"]["positive_ids"], train["101"]["doc_ids"], train["101"]["doc_scores"]) == (["3"], ["3", "4"], [1, 0])
    assert train["102"]["positive_ids"] == [] and train["102"]["doc_ids"] == []
    assert (dev["200"]["positive_ids"], dev["200"]["doc_ids"], dev["200"]["doc_scores"]) == (
        ["2#0", "2#1", "2#2", "0"], ["2", "0", "5"], [2, 1, 0])
    assert [i["role"] for i in manifest.inputs] == ["passages", "questions", "questions", "qrels", "qrels"]


def test_directory_reads_the_queries_its_qrels_judge(tmp_path):
    msmarco_files(tmp_path / "msmarco")
    write(tmp_path / "msmarco" / "queries.eval.tsv", ["300\tno qrels for me"])
    manifest = ingest([str(tmp_path / "msmarco")], str(tmp_path / "out"), window=0)
    assert manifest.counts["questions"] == {"dev": 1, "train": 2}  # 102 unjudged and eval without qrels are not read
    assert rows(tmp_path / "out", "train")["101"]["doc_scores"] == [1, 0]
    assert [(i["role"], i["path"].rsplit("/", 1)[1]) for i in manifest.inputs] == [
        ("passages", "collection.tsv"), ("queries", "queries.dev.small.tsv"), ("qrels", "qrels.dev.small.tsv"),
        ("queries", "queries.train.tsv"), ("qrels", "qrels.train.tsv")]
    only_dev = ingest([f"dev={tmp_path / 'msmarco'}"], str(tmp_path / "dev"), window=0)
    assert only_dev.counts["questions"] == {"dev": 1} and only_dev.counts["passages"] == 6


def test_given_negatives_from_triples_and_top1000(tmp_path):
    files = msmarco_files(tmp_path)
    triples = write(tmp_path / "qidpidtriples.train.full.2.tsv", [
        "100\t1\t4", "100\t1\t0", "100\t1\t4", "101\t3\t5", "999\t1\t2"])  # 999: no such question
    top = write(tmp_path / "top1000.dev.tsv", [
        "200\t2\tlong words\tw0 w1", "200\t4\tlong words\tnothing relevant", "200\t0\tlong words\tx\ty"])
    inputs = [str(files[k]) for k in ("collection", "train", "dev", "qrels_train", "qrels_dev")] + [str(triples), str(top)]
    manifest = ingest(inputs, str(tmp_path / "out"), window=0)
    train, dev = rows(tmp_path / "out", "train"), rows(tmp_path / "out", "dev")
    assert train["100"]["hard_negative_ids"] == ["4", "0"]
    assert train["101"]["hard_negative_ids"] == ["5"]
    assert dev["200"]["hard_negative_ids"] == ["4"]  # 2 and 0 are judged relevant: positives, not negatives
    assert manifest.counts["negatives_without_question"] == 1
    assert [i["role"] for i in manifest.inputs][-2:] == ["negatives", "negatives"]

    mine(str(tmp_path / "out"), str(tmp_path / "mine"), given_negatives="only", negatives=5, splits=["train"])
    examples = {row["id"]: row for row in datasets.load_from_disk(str(tmp_path / "mine" / "examples" / "train"))}
    assert examples["100"]["hard_negative_ids"] == ["4", "0"]


def test_qrels_option_attaches_to_jsonl_questions(tmp_path):
    psgs = collection(tmp_path)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "question": "what is the manhattan project"},
        {"id": "b", "question": "long words", "positive_ids": ["2"], "answers": ["w5"]},
    ]))
    held = write(tmp_path / "held.tsv", ["9\twhat causes colds"])
    judgements = write(tmp_path / "judged.txt", ["a 0 1 2", "b 0 2 3", "b 0 5 0"])
    more = write(tmp_path / "more.txt", ["9\t0\t3\t1"])
    manifest = ingest([str(psgs), str(questions), f"test={held}"], str(tmp_path / "out"), window=4,
                      qrels=[str(judgements), f"test={more}"])
    train, test = rows(tmp_path / "out", "train"), rows(tmp_path / "out", "test")
    assert (train["a"]["positive_ids"], train["a"]["doc_ids"], train["a"]["doc_scores"]) == (["1#0", "1#1"], ["1"], [2])
    # the gold passage's judgement takes the qrels grade, and a judged document's windows are all positives
    assert (train["b"]["doc_ids"], train["b"]["doc_scores"]) == (["2", "5"], [3, 0])
    assert train["b"]["positive_ids"] == ["2#1", "2#0", "2#2"]
    assert test["9"]["positive_ids"] == ["3"]
    assert manifest.config["qrels"] == [str(judgements), f"test={more}"]
    assert [i["role"] for i in manifest.inputs][-2:] == ["qrels", "qrels"]

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["ingest", str(psgs), str(questions), "--qrels", f"train={judgements}",
                                      "--out", str(out), "--window", "4"])
    assert result.exit_code == 0, result.output
    assert rows(out, "train") == train


def directory(path, queries, qrels):
    collection(path)
    write(path / "queries.dev.tsv", queries)
    write(path / "qrels.dev.tsv", qrels)
    return path


@pytest.mark.parametrize("files, message", [
    (lambda t: [write(t / "collection.tsv", ["0\tok", "1 no tab"])], "collection.tsv:2: expected pid<TAB>passage"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine", "", "2"])], "queries.dev.tsv:3: expected qid<TAB>query"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "qrels.dev.tsv", ["1 0 2 1 9"])],
     "qrels.dev.tsv:1: 5 fields, expected TREC 'qid 0 doc grade'"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "qrels.dev.tsv", ["1 0 2 yes"])],
     "qrels.dev.tsv:1: grade 'yes' is not an integer"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "qrels.dev.tsv", ["1 0 2 1", "7 0 2 1"])],
     "qrels.dev.tsv:2: query '7' is not among the 1 'dev' questions (name the split it judges"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "qrels.dev.tsv", ["1 0 2 1", "1 0 2 0"])],
     "qrels.dev.tsv:2: query '1' judges document '2' twice"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "qrels.dev.tsv", ["1 0 77 1"])],
     "qrels.dev.tsv:1: document '77' is not in the corpus"),
    (lambda t: [directory(t / "d", ["1\tfine"], ["1 0 2 1", "8 0 2 1"])], "qrels.dev.tsv:2: query '8' is not in queries.dev.tsv"),
    (lambda t: [collection(t), write(t / "queries.train.tsv", ["1\tfine"]), write(t / "qidpidtriples.train.tsv", ["1\t2"])],
     "qidpidtriples.train.tsv:1: 2 tab-separated fields, expected qid<TAB>pid+<TAB>pid-"),
    (lambda t: [collection(t), write(t / "queries.dev.tsv", ["1\tfine"]), write(t / "top1000.dev.tsv", ["1\t2\tfine"])],
     "top1000.dev.tsv:1: 3 tab-separated fields, expected qid<TAB>pid<TAB>query<TAB>passage"),
    (lambda t: [collection(t), write(t / "lines.tsv", ["1\tfine"])], "lines.tsv: an id<TAB>text file, but passages or queries?"),
    (lambda t: ["train=" + str(collection(t))], "collection.tsv: holds passages, so 'train=' names no question split"),
], ids=["collection without tab", "query without tab", "qrels field count", "qrels grade", "qrels unknown query",
        "qrels repeat", "qrels unknown passage", "directory qrels unknown query", "triples", "top1000", "ambiguous tsv",
        "split on a collection"])
def test_bad_lines_are_one_line_errors(tmp_path, files, message):
    (tmp_path / "in").mkdir()
    inputs = files(tmp_path / "in")
    result = CliRunner().invoke(app, ["ingest", *map(str, inputs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
