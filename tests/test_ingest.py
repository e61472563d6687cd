"""`ragkit ingest`: readers, passage windows, positives, dev split, writer, manifest."""

from __future__ import annotations

import gzip
import json
import random

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit import ingest
from ragkit.artifacts import Manifest, hash_path
from ragkit.cli import app
from ragkit.ingestion import carve_dev, detect_format, files, infer_split, passage_ids, window_ranges, writers
from ragkit.errors import RagkitError


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


def load(out, name):
    return datasets.load_from_disk(str(out / name))


def by_id(dataset):
    return {row["id"]: row for row in dataset}


# --- windows ------------------------------------------------------------------------------------------


def test_window_ranges_keep_short_and_whole_documents():
    text = "  one two\nthree  "
    assert window_ranges(text, 5, 5) == [(2, 15)]
    assert window_ranges(text, 0, 1) == [(2, 15)]
    assert window_ranges(words(0, 300), 0, 100) == [(0, len(words(0, 300)))]
    start, end = window_ranges("   ", 10, 10)[0]
    assert start == end


def test_window_ranges_without_overlap_end_with_a_short_window():
    text = "w0 w1  w2\nw3 w4 w5 w6\tw7 w8 w9 "
    slices = [text[s:e] for s, e in window_ranges(text, 4, 4)]
    assert slices == ["w0 w1  w2\nw3", "w4 w5 w6\tw7", "w8 w9"]  # verbatim: inner white space kept


def test_window_ranges_with_stride_overlap():
    text = words(0, 10)
    slices = [text[s:e].split() for s, e in window_ranges(text, 4, 2)]
    assert slices == [[f"w{i}" for i in range(a, min(a + 4, 10))] for a in (0, 2, 4, 6)]
    # exactly two full windows: no trailing window made only of overlap
    assert [text[s:e] for s, e in window_ranges(words(0, 8), 4, 4)] == [words(0, 4), words(4, 8)]


def test_window_ranges_match_a_naive_word_split():
    rng = random.Random(0)
    spaces = [" ", "  ", "\n", "\t", "\u00a0", "\u3000", " \r\n "]
    for _ in range(300):
        tokens = [rng.choice(["a", "bb", "ccc", "é", "x.y", "-"]) for _ in range(rng.randrange(0, 30))]
        text = rng.choice(["", " "]) + "".join(t + rng.choice(spaces) for t in tokens)
        window = rng.randrange(1, 8)
        stride = rng.randrange(1, window + 1)
        expected, first = [], 0
        while tokens:
            expected.append(tokens[first:first + window])
            if first + window >= len(tokens):
                break
            first += stride
        got = window_ranges(text, window, stride)
        assert [text[s:e].split() for s, e in got] == (expected or [[]])
        assert all(text[s:e] == text[s:e].strip() for s, e in got)


def test_passage_ids():
    assert passage_ids("d7", 1) == ["d7"]
    assert passage_ids("d7", 3) == ["d7#0", "d7#1", "d7#2"]


@pytest.mark.parametrize("name, split", [
    ("nq-train.json", "train"), ("trivia-dev.qas.csv", "dev"), ("nq-test.qas.csv", "test"),
    ("dev-v2.0.json", "dev"), ("squad1-validation.jsonl", "validation"), ("amazon_reviews_v1.0.json", "train"),
    ("devices.jsonl", "train"), ("attest.jsonl", "train"),
])
def test_infer_split(name, split):
    assert infer_split(name) == split


def test_detect_format(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    write_jsonl(beir / "corpus.jsonl", [{"_id": "1", "text": "x"}])
    squad = tmp_path / "s.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": []}]}))
    dpr = tmp_path / "r.json"
    dpr.write_text(json.dumps([{"question": "q", "answers": [], "positive_ctxs": []}]))
    other_json = tmp_path / "o.json"
    other_json.write_text(json.dumps([{"question": "q"}]))
    psgs = write_lines(tmp_path / "psgs.tsv", ["id\ttext\ttitle", "1\tx\tt"])
    qas = write_lines(tmp_path / "q.qas.csv", ["who?\t['me']"])
    jsonl = write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "text": "x"}])
    assert detect_format(beir) == "beir"
    assert detect_format(squad) == "squad"
    assert detect_format(dpr) == "dpr-json"
    assert detect_format(psgs) == "dpr-passages"
    assert detect_format(qas) == "dpr-qas"
    assert detect_format(jsonl) == "jsonl"
    assert detect_format(other_json, "dpr") == "dpr-json"
    with pytest.raises(RagkitError, match="cannot tell the JSON format"):
        detect_format(other_json)
    with pytest.raises(RagkitError, match="--format squad cannot read '.tsv'"):
        detect_format(psgs, "squad")
    with pytest.raises(RagkitError, match="cannot read '.txt'"):
        detect_format(write_lines(tmp_path / "a.txt", ["x"]))


# --- readers of big files --------------------------------------------------------------------------


def test_json_array_items_across_tiny_read_chunks(tmp_path, monkeypatch):
    items = [{"question": f"q{i}", "answers": ["a b", "c"] * i, "positive_ctxs": [{"text": "é" * 9}]} for i in range(6)]
    body = "[\n" + ",\n".join(json.dumps(item, indent=1, ensure_ascii=False) for item in items) + "\n]\n"
    path = tmp_path / "r.json"
    path.write_text(body, encoding="utf-8")
    monkeypatch.setattr(files, "_READ_CHUNK", 7)  # every item spans many reads; "é" is split across reads
    got = list(files.json_array_items(path))
    assert [item for _, item in got] == items
    starts = [i + 1 for i, line in enumerate(body.split("\n")) if line.startswith("{")]
    assert [line for line, _ in got] == starts


def test_digest_set_matches_a_python_set():
    rng = random.Random(0)
    members: set[str] = set()
    seen = writers.DigestSet()
    for _ in range(40):
        keys = [str(rng.randrange(3000)) for _ in range(rng.randrange(1, 120))]
        digests = np.array([writers.digest(k) for k in keys], dtype="S16")
        assert seen.contains(digests).tolist() == [k in members for k in keys]
        new = {writers.digest(k) for k in keys if k not in members}
        seen.add(np.array(sorted(new), dtype="S16"))
        members.update(keys)
    assert len(seen) == len(members)
    assert len(seen._runs) <= int(np.log2(len(members))) + 1


def test_passage_writer_shards_load_as_one_dataset(tmp_path):
    writer = writers.PassageWriter(tmp_path / "passages", shard_chars=15)
    rows = [{"id": f"p{i}", "title": "t", "text": words(0, i + 1), "doc_id": f"d{i}"} for i in range(12)]
    for batch in (rows[:5], rows[5:6], rows[6:]):
        writer.write({name: [r[name] for r in batch] for name in writers.PASSAGE_COLUMNS})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "passages").glob("*.arrow")) == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    loaded = datasets.load_from_disk(str(tmp_path / "passages"))
    assert loaded.to_list() == rows
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["passages"]


# --- DPR -------------------------------------------------------------------------------------------


def dpr_files(tmp_path):
    long_text = words(0, 10) + " answer here " + words(12, 20)  # 20 words: windows of 8 -> 3
    psgs = write_lines(tmp_path / "psgs_w100.tsv", [
        "id\ttext\ttitle",
        '1\t"He said ""hi"" twice"\tGreeting',
        f"2\t{long_text}\tLong",
        "3\tnothing to see\tOther",
        "4\tanother passage\tOther",
    ])
    train = tmp_path / "nq-train.json"
    train.write_text(json.dumps([
        {"question": "what is here", "answers": ["answer here"],
         "positive_ctxs": [{"passage_id": "2", "title": "Long", "text": long_text}],
         "hard_negative_ctxs": [{"psg_id": 3, "title": "Other", "text": "nothing to see"}],
         "negative_ctxs": [{"id": "4", "title": "Other", "text": "another passage"}]},
        {"question": "what was said", "answers": ["hi"],
         "positive_ctxs": [{"passage_id": "1", "title": "Greeting", "text": 'He said "hi" twice'}],
         "hard_negative_ctxs": [], "negative_ctxs": []},
    ], indent=2))
    qas = write_lines(tmp_path / "nq-test.qas.csv", ["who said hi\t['he', 'He']", "where\t[]"])
    return psgs, train, qas


def test_dpr_tsv_json_and_qas(tmp_path):
    psgs, train, qas = dpr_files(tmp_path)
    manifest = ingest([str(psgs), str(train), str(qas)], str(tmp_path / "out"), window=8)
    out = tmp_path / "out"
    passages = by_id(load(out, "passages"))
    assert list(passages) == ["1", "2#0", "2#1", "2#2", "3", "4"]
    assert passages["1"] == {"id": "1", "title": "Greeting", "text": 'He said "hi" twice', "doc_id": "1"}
    assert {passages[f"2#{k}"]["title"] for k in range(3)} == {"Long"}
    assert passages["2#1"]["text"] == "w8 w9 answer here w12 w13 w14 w15"
    assert manifest.counts["documents"] == 4 and manifest.counts["passages"] == 6
    assert manifest.counts["questions"] == {"train": 2, "test": 2}
    assert manifest.counts["questions_without_positive"] == 2  # qas questions name no gold passage

    train_rows = load(out, "questions/train").to_list()
    assert train_rows[0] == {
        "id": "train-0", "question": "what is here", "answers": ["answer here"],
        "positive_ids": ["2#1"],  # the gold passage was cut: only its window holding the answer
        "hard_negative_ids": ["3"], "doc_ids": ["2"], "doc_scores": [1],
    }
    assert train_rows[1]["positive_ids"] == ["1"]
    test_rows = load(out, "questions/test").to_list()
    assert [(r["id"], r["question"], r["answers"]) for r in test_rows] == [
        ("test-0", "who said hi", ["he", "He"]), ("test-1", "where", [])]


def test_gzipped_inputs_read_like_the_plain_files(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    files = dpr_files(plain)
    packed = tmp_path / "packed"
    packed.mkdir()
    gzipped = []
    for path in files:
        target = packed / (path.name + ".gz")
        target.write_bytes(gzip.compress(path.read_bytes()))
        gzipped.append(target)
    assert [detect_format(p) for p in gzipped] == ["dpr-passages", "dpr-json", "dpr-qas"]
    one = ingest([str(p) for p in files], str(tmp_path / "a"), window=8)
    two = ingest([str(p) for p in gzipped], str(tmp_path / "b"), window=8)
    assert one.counts == two.counts
    for name in ("passages", "questions/train", "questions/test"):
        assert load(tmp_path / "a", name).to_list() == load(tmp_path / "b", name).to_list()


def test_cut_gold_passage_without_answer_in_any_window_keeps_all_windows(tmp_path):
    psgs = write_lines(tmp_path / "psgs.tsv", ["id\ttext\ttitle", f"7\t{words(0, 10)}\tT"])
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "a", "answers": ["missing"], "positive_ids": ["7"]},
        {"question": "b", "answers": ["w4"], "positive_ids": [7]},
    ])
    ingest([str(psgs), str(questions)], str(tmp_path / "out"), window=3)
    rows = load(tmp_path / "out", "questions/train").to_list()
    assert rows[0]["positive_ids"] == ["7#0", "7#1", "7#2", "7#3"]
    assert rows[1]["positive_ids"] == ["7#1"]


def test_retriever_json_alone_brings_its_ctxs_as_corpus(tmp_path):
    _, train, _ = dpr_files(tmp_path)
    manifest = ingest([str(train)], str(tmp_path / "out"), window=0)
    passages = by_id(load(tmp_path / "out", "passages"))
    assert list(passages) == ["2", "3", "4", "1"]  # first appearance; repeats are not duplicates here
    assert passages["1"]["text"] == 'He said "hi" twice'
    assert manifest.counts["duplicates_dropped"] == 0
    assert load(tmp_path / "out", "questions/train")["positive_ids"] == [["2"], ["1"]]


# --- BEIR ------------------------------------------------------------------------------------------


def test_beir_directory(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [
        {"_id": "d1", "title": "One", "text": words(0, 5)},
        {"_id": "d2", "title": "Two", "text": words(0, 12)},
        {"_id": "d3", "text": "no title"},
    ])
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"},
                                         {"_id": "q3", "text": "never judged"}])
    write_lines(beir / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q2\td2\t2", "q2\td1\t0", "q1\td3\t1"])
    manifest = ingest([str(beir)], str(tmp_path / "out"), window=5)
    passages = by_id(load(tmp_path / "out", "passages"))
    assert list(passages) == ["d1", "d2#0", "d2#1", "d2#2", "d3"]
    assert passages["d3"]["title"] == ""
    rows = load(tmp_path / "out", "questions/test").to_list()
    assert [(r["id"], r["question"], r["answers"]) for r in rows] == [("q2", "second", []), ("q1", "first", [])]
    assert rows[0]["positive_ids"] == ["d2#0", "d2#1", "d2#2"]  # grade 0 gives no positive
    assert (rows[0]["doc_ids"], rows[0]["doc_scores"]) == (["d2", "d1"], [2, 0])
    assert rows[1]["positive_ids"] == ["d3"]
    assert manifest.counts["questions"] == {"test": 2}
    assert [(i["role"], i["path"].rsplit("/", 2)[-2:]) for i in manifest.inputs] == [
        ("passages", ["beir", "corpus.jsonl"]), ("queries", ["beir", "queries.jsonl"]), ("qrels", ["qrels", "test.tsv"])]

    write_lines(beir / "qrels" / "dev.tsv", ["query-id\tcorpus-id\tscore", "q3\td1\t1"])
    assert ingest([str(beir)], str(tmp_path / "both")).counts["questions"] == {"dev": 1, "test": 2}
    assert ingest([f"dev={beir}"], str(tmp_path / "dev")).counts["questions"] == {"dev": 1}


# --- SQuAD -----------------------------------------------------------------------------------------


def squad_file(tmp_path, qas, context=None, name="train-v2.0.json"):
    context = context or words(0, 12)
    path = tmp_path / name
    path.write_text(json.dumps({"version": "v2.0", "data": [
        {"title": "Art", "paragraphs": [{"context": "short one", "qas": []}, {"context": context, "qas": qas}]},
    ]}))
    return path


def answer(text, context):
    return {"text": text, "answer_start": context.index(text)}


def test_squad_spans_map_to_windows_at_boundaries(tmp_path):
    context = words(0, 12)  # windows of 4: w0-w3 | w4-w7 | w8-w11
    qas = [
        {"id": "end", "question": "q", "answers": [answer("w2 w3", context)]},  # last words of window 0
        {"id": "start", "question": "q", "answers": [answer("w4", context), answer("w4", context)]},
        {"id": "cross", "question": "q", "answers": [answer("w3 w4", context)]},
        {"id": "two", "question": "q", "answers": [answer("w1", context), answer("w9 w10", context), answer(" w1", context)]},
        {"id": "none", "question": "q", "answers": [], "is_impossible": True, "plausible_answers": []},
    ]
    path = squad_file(tmp_path, qas, context)
    manifest = ingest([str(path)], str(tmp_path / "out"), window=4)
    assert list(by_id(load(tmp_path / "out", "passages"))) == ["Art-0", "Art-1#0", "Art-1#1", "Art-1#2"]
    rows = by_id(load(tmp_path / "out", "questions/train"))
    assert rows["end"]["positive_ids"] == ["Art-1#0"]
    assert rows["start"]["positive_ids"] == ["Art-1#1"] and rows["start"]["answers"] == ["w4"]
    assert rows["cross"]["positive_ids"] == []  # no window holds the whole span
    assert rows["two"]["positive_ids"] == ["Art-1#0", "Art-1#2"]
    assert rows["two"]["answers"] == ["w1", "w9 w10", " w1"]
    assert (rows["end"]["doc_ids"], rows["end"]["doc_scores"]) == (["Art-1"], [1])
    assert manifest.counts["unanswerable_skipped"] == 1
    assert manifest.counts["questions_without_positive"] == 1

    ingest([str(path)], str(tmp_path / "overlap"), window=4, stride=2)  # w2-w5 holds "w3 w4"
    rows = by_id(load(tmp_path / "overlap", "questions/train"))
    assert rows["cross"]["positive_ids"] == ["Art-1#1"]
    assert rows["end"]["positive_ids"] == ["Art-1#0", "Art-1#1"]


def test_squad_titles_and_ids_across_files(tmp_path):
    train = squad_file(tmp_path, [{"id": "a", "question": "q", "answers": [answer("w5", words(0, 12))]}])
    dev = tmp_path / "dev-v2.0.json"
    dev.write_text(json.dumps({"data": [{"title": "Other", "paragraphs": [
        {"context": "x y", "qas": [{"id": "b", "question": "q", "answers": [{"text": "y", "answer_start": 2}]}]}]}]}))
    manifest = ingest([str(train), str(dev)], str(tmp_path / "out"), window=0)
    passages = load(tmp_path / "out", "passages")
    assert passages["id"] == ["Art-0", "Art-1", "Other-0"]
    assert passages["title"] == ["Art", "Art", "Other"]
    assert manifest.counts["questions"] == {"train": 1, "dev": 1}
    assert load(tmp_path / "out", "questions/dev")["positive_ids"] == [["Other-0"]]


# --- jsonl -----------------------------------------------------------------------------------------


def test_jsonl_with_custom_fields_and_named_split(tmp_path):
    mixed = write_jsonl(tmp_path / "kb.jsonl", [
        {"pid": "p1", "heading": "H1", "body": "alpha beta gamma"},
        {"pid": "p2", "body": "delta"},
        {"q": "which letter", "golds": ["p2"], "replies": ["delta"], "pid": "mine"},
    ])
    held = write_jsonl(tmp_path / "more.jsonl", [{"q": "first letter", "replies": "alpha", "golds": ["p1"]}])
    manifest = ingest([str(mixed), f"heldout={held}"], str(tmp_path / "out"), id_field="pid", title_field="heading",
                      text_field="body", question_field="q", answers_field="replies", positives_field="golds")
    passages = load(tmp_path / "out", "passages").to_list()
    assert passages == [{"id": "p1", "title": "H1", "text": "alpha beta gamma", "doc_id": "p1"},
                        {"id": "p2", "title": "", "text": "delta", "doc_id": "p2"}]
    assert load(tmp_path / "out", "questions/train").to_list()[0] == {
        "id": "mine", "question": "which letter", "answers": ["delta"], "positive_ids": ["p2"],
        "hard_negative_ids": [], "doc_ids": ["p2"], "doc_scores": [1]}
    heldout = load(tmp_path / "out", "questions/heldout").to_list()
    assert [(r["id"], r["answers"], r["positive_ids"]) for r in heldout] == [("heldout-0", ["alpha"], ["p1"])]
    assert [i["role"] for i in manifest.inputs] == ["passages+questions", "questions"]


# --- dev split, dedup ------------------------------------------------------------------------------


def test_carve_dev_keeps_documents_on_one_side():
    chain = [["a"], ["a", "b"], ["b"], ["c"], ["d"], ["e"], [], []]
    for seed in range(20):
        dev = carve_dev(chain, 0.4, seed)
        assert len({dev[0], dev[1], dev[2]}) == 1  # linked through a and b: one group

    rng = random.Random(0)
    documents = [[f"d{rng.randrange(150)}" for _ in range(rng.randrange(0, 3))] for _ in range(300)]
    dev = carve_dev(documents, 0.2, seed=5)
    dev_docs = {d for docs, flag in zip(documents, dev) if flag for d in docs}
    train_docs = {d for docs, flag in zip(documents, dev) if not flag for d in docs}
    assert not dev_docs & train_docs
    assert abs(sum(dev) - 60) <= 5
    assert carve_dev(documents, 0.2, seed=5) == dev
    assert carve_dev(documents, 0.2, seed=6) != dev


def test_dev_fraction_through_ingest(tmp_path):
    psgs = write_lines(tmp_path / "psgs.tsv", ["id\ttext\ttitle"] + [f"{i}\tpassage {i}\tT" for i in range(30)])
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": f"q{i}", "question": f"question {i}", "positive_ids": [str(i % 30), str((i * 7) % 30)]} for i in range(60)
    ])
    runs = []
    for name in ("a", "b"):
        manifest = ingest([str(psgs), str(questions)], str(tmp_path / name), dev_fraction=0.25, seed=3)
        train, dev = load(tmp_path / name, "questions/train"), load(tmp_path / name, "questions/dev")
        assert not {d for ids in train["doc_ids"] for d in ids} & {d for ids in dev["doc_ids"] for d in ids}
        assert manifest.counts["questions"] == {"train": len(train), "dev": len(dev)}
        assert len(train) + len(dev) == 60 and len(dev) > 0
        runs.append(dev["id"])
    assert runs[0] == runs[1]


def test_validation_fraction_is_carved_after_dev_and_leaves_dev_unchanged(tmp_path):
    psgs = write_lines(tmp_path / "psgs.tsv", ["id\ttext\ttitle"] + [f"{i}\tpassage {i}\tT" for i in range(40)])
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": f"q{i}", "question": f"question {i}", "positive_ids": [str(i % 40)]} for i in range(80)
    ])
    ingest([str(psgs), str(questions)], str(tmp_path / "two"), dev_fraction=0.25, seed=3)
    manifest = ingest([str(psgs), str(questions)], str(tmp_path / "three"), dev_fraction=0.25, validation_fraction=0.2, seed=3)
    assert load(tmp_path / "three", "questions/dev")["id"] == load(tmp_path / "two", "questions/dev")["id"]
    parts = {split: load(tmp_path / "three", f"questions/{split}") for split in ("train", "validation", "dev")}
    documents = {split: {d for ids in rows["doc_ids"] for d in ids} for split, rows in parts.items()}
    assert not documents["train"] & documents["validation"]
    assert not documents["validation"] & documents["dev"] and not documents["train"] & documents["dev"]
    assert set(parts["train"]["id"]) | set(parts["validation"]["id"]) == set(load(tmp_path / "two", "questions/train")["id"])
    assert 0 < len(parts["validation"]) < len(parts["train"])
    assert manifest.counts["questions"] == {split: len(rows) for split, rows in parts.items()}
    with pytest.raises(RagkitError, match="--validation-fraction"):
        ingest([str(psgs), str(questions)], str(tmp_path / "bad"), validation_fraction=0.999, seed=3)


def test_dedup_keeps_the_first_passage(tmp_path):
    psgs = write_lines(tmp_path / "psgs.tsv", ["id\ttext\ttitle", "1\tfirst\tT", "2\tother\tT", "1\tsecond\tT"])
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "2", "text": "again"}, {"id": "3", "text": "new"}])
    manifest = ingest([str(psgs), str(more)], str(tmp_path / "out"), dedup=True)
    passages = load(tmp_path / "out", "passages")
    assert (passages["id"], passages["text"]) == (["1", "2", "3"], ["first", "other", "new"])
    assert manifest.counts["duplicates_dropped"] == 2


# --- the command line and the artifact -------------------------------------------------------------


def test_cli_writes_the_artifact_and_manifest(tmp_path):
    psgs, train, qas = dpr_files(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ingest", str(psgs), f"dev={qas}", "--out", str(out), "--window", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (ingest: documents=4, passages=6,")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "passages", "questions"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    manifest = Manifest.load(out)
    assert manifest.stage == "ingest"
    assert (manifest.config["window"], manifest.config["stride"]) == (8, 8)
    assert manifest.files == {"passages": "passages", "questions/dev": "questions/dev"}
    assert [(i["role"], i["sha256"]) for i in manifest.inputs] == [("passages", hash_path(psgs)), ("questions", hash_path(qas))]
    assert manifest.counts["questions"] == {"dev": 2}
    assert load(out, "passages").features == writers.passage_features()
    assert load(out, "questions/dev").features == writers.question_features()
