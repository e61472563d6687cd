"""Bad input to `ragkit ingest`: one `error:` line naming the file (and line), exit 2, no output left."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from ragkit.cli import app

PSGS_HEADER = "id\ttext\ttitle\n"


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def psgs(tmp_path, *rows: str):
    return write(tmp_path / "psgs.tsv", PSGS_HEADER + "".join(r + "\n" for r in rows))


def squad(tmp_path, qas, context="the quick brown fox"):
    return write(tmp_path / "squad.json", json.dumps({"data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}))


def beir(tmp_path, qrels: str):
    root = tmp_path / "scifact"
    write(root / "corpus.jsonl", jsonl({"_id": "d1", "title": "", "text": "one"}, {"_id": "d2", "text": "two"}))
    write(root / "queries.jsonl", jsonl({"_id": "q1", "text": "first?"}))
    write(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + qrels)
    return root


# Each case: (files to create -> (inputs, extra flags), file name the message must name, text it must hold).
CASES = {
    "malformed jsonl line": (
        lambda t: ([write(t / "p.jsonl", jsonl({"id": "1", "text": "x"}) + '{"id": "2", "text": \n')], []),
        "p.jsonl", "p.jsonl:2: malformed JSON"),
    "malformed retriever JSON": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "nq-train.json", '[\n {"question": "q", "answers": [],\n  "positive_ctxs": []}\n {"question": "r"}\n]')], []),
        "nq-train.json", "nq-train.json:4: malformed JSON (expected ',' or ']'"),
    "truncated retriever JSON": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "nq-dev.json", '[{"question": "q", "answers": [], "positive_ctxs": []},\n{"question": "r", "ans')], []),
        "nq-dev.json", "nq-dev.json:2: malformed JSON"),
    "malformed SQuAD JSON": (
        lambda t: ([write(t / "squad.json", '{"data": [\n{"title": "T",\n "paragraphs": [}]}')], ["--format", "squad"]),
        "squad.json", "squad.json:3: malformed JSON"),
    "wrong field count in passage tsv": (
        lambda t: ([psgs(t, "1\tx\tt", "2\tonly two")], []),
        "psgs.tsv", "psgs.tsv:3: 2 tab-separated fields, the header has 3"),
    "unbalanced quote in passage tsv": (
        lambda t: ([psgs(t, '1\t"x\tt')], []),
        "psgs.tsv", "psgs.tsv:2:"),
    "qas answers not a list": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "nq-test.qas.csv", "who?\t['a']\nwhat?\tParis\n")], []),
        "nq-test.qas.csv", "nq-test.qas.csv:2: the answers field is not a Python list"),
    "passage without id": (
        lambda t: ([write(t / "kb.jsonl", jsonl({"id": "1", "text": "x"}, {"text": "y"}))], []),
        "kb.jsonl", "kb.jsonl:2: missing field 'id' (set --id-field"),
    "line that is neither passage nor question": (
        lambda t: ([write(t / "kb.jsonl", jsonl({"body": "x"}))], []),
        "kb.jsonl", "kb.jsonl:1: neither 'text' (passage) nor 'question' (question)"),
    "question without text in retriever JSON": (
        lambda t: ([write(t / "nq-train.json", json.dumps([{"answers": [], "positive_ctxs": []}]))], ["--format", "dpr"]),
        "nq-train.json", "nq-train.json:1: missing field 'question'"),
    "BEIR corpus line without text": (
        lambda t: ([write(t / "b" / "corpus.jsonl", jsonl({"_id": "d1", "title": "x"})).parent], []),
        "corpus.jsonl", "corpus.jsonl:1: missing field 'text'"),
    "empty jsonl": (
        lambda t: ([write(t / "empty.jsonl", "\n\n")], []),
        "empty.jsonl", "empty input"),
    "tsv with a header only": (
        lambda t: ([psgs(t)], []),
        "psgs.tsv", "empty input"),
    "empty JSON file": (
        lambda t: ([write(t / "train.json", "")], []),
        "train.json", "empty input"),
    "empty retriever JSON list": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "nq-train.json", "[ ]")], ["--format", "dpr"]),
        "nq-train.json", "empty input"),
    "duplicate passage id": (
        lambda t: ([psgs(t, "1\tx\tt", "2\ty\tt", "1\tz\tt")], []),
        "psgs.tsv", "psgs.tsv:4: duplicate passage id '1'"),
    "duplicate across files": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "more.jsonl", jsonl({"id": "1", "text": "y"}))], []),
        "more.jsonl", "more.jsonl:1: duplicate passage id '1'"),
    "source id equal to a window id": (
        lambda t: ([psgs(t, "a\tw0 w1 w2 w3\tt", "a#1\tw4\tt")], ["--window", "2"]),
        "psgs.tsv", "psgs.tsv:3: duplicate passage id 'a#1'"),
    "non-UTF-8 jsonl": (
        lambda t: ([write(t / "bad.jsonl", jsonl({"id": "1", "text": "x"}).encode() * 2 + b'{"id": "3", "text": "caf\xe9"}\n')], []),
        "bad.jsonl", "bad.jsonl:3: not valid UTF-8"),
    "non-UTF-8 tsv": (
        lambda t: ([write(t / "psgs.tsv", PSGS_HEADER.encode() + b"1\tx\tt\n2\t\xff\xfe\tt\n")], []),
        "psgs.tsv", "psgs.tsv:3: not valid UTF-8"),
    "non-UTF-8 SQuAD JSON": (
        lambda t: ([write(t / "squad.json", b'{"data": [\n{"title": "T\x92s",\n"paragraphs": []}]}')], ["--format", "squad"]),
        "squad.json", "squad.json:2: not valid UTF-8"),
    "non-UTF-8 retriever JSON": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "r.json", b'[{"question": "q",\n"answers": ["\xc3"]}]')], ["--format", "dpr"]),
        "r.json", "r.json:2: not valid UTF-8"),
    "SQuAD span that misses its context, --strict": (
        lambda t: ([squad(t, [{"id": "q7", "question": "what?", "answers": [{"text": "brown", "answer_start": 3}]}])], ["--strict"]),
        "squad.json", "question 'q7': answer 'brown' does not match its context at answer_start=3"),
    "SQuAD answer nowhere near its offset": (
        lambda t: ([squad(t, [{"id": "q8", "question": "what?", "answers": [{"text": "fox", "answer_start": 4}]},
                              {"id": "q9", "question": "who?", "answers": [{"text": "wolf", "answer_start": 4}]}],
                          context="the quick brown fox" + " jumps" * 20 + " fox")], []),
        "squad.json", "question 'q9': answer 'wolf' does not match its context at answer_start=4 (the context there "
                      "reads 'quic') and does not occur within 32 characters of it; fix the offset or the text"),
    "qrels naming an unknown document": (
        lambda t: ([beir(t, "q1\td1\t1\nq1\td9\t1\n")], []),
        "test.tsv", "test.tsv:3: document 'd9' is not in the corpus"),
    "qrels naming an unknown query": (
        lambda t: ([beir(t, "q1\td1\t1\nq5\td2\t1\n")], []),
        "test.tsv", "test.tsv:3: query 'q5' is not in queries.jsonl"),
    "unknown BEIR split": (
        lambda t: (["dev=" + str(beir(t, "q1\td1\t1\n"))], []),
        "scifact", "no qrels/dev.tsv (splits here: test)"),
    "gold passage not in the corpus": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "q.jsonl", jsonl({"question": "q", "positive_ids": ["1"]}, {"question": "r", "positive_ids": ["8"]}))], []),
        "q.jsonl", "q.jsonl:2: document '8' is not in the corpus"),
    "truncated gzip file": (
        lambda t: ([write(t / "psgs.tsv.gz", gzip.compress((PSGS_HEADER + "1\tx\tt\n" * 50).encode())[:-12])], []),
        "psgs.tsv.gz", "is not a readable gzip file"),
    "gzip of non-UTF-8 bytes": (
        lambda t: ([write(t / "p.jsonl.gz", gzip.compress(jsonl({"id": "1", "text": "x"}).encode() + b'{"id": "2", "text": "\xff"}\n'))], []),
        "p.jsonl.gz", "p.jsonl.gz:2: not valid UTF-8"),
    "unknown format": (
        lambda t: ([write(t / "notes.txt", "hello\n")], []),
        "notes.txt", "cannot read '.txt' files"),
    "JSON of no known shape": (
        lambda t: ([write(t / "stuff.json", json.dumps({"rows": []}))], []),
        "stuff.json", "cannot tell the JSON format"),
    "missing file": (
        lambda t: ([t / "nowhere.jsonl"], []),
        "nowhere.jsonl", "no such file or directory"),
    "dev split already present": (
        lambda t: ([psgs(t, "1\tx\tt"), write(t / "dev.jsonl", jsonl({"question": "q", "positive_ids": ["1"]}))], ["--dev-fraction", "0.1"]),
        "dev.jsonl", "already hold a 'dev' split"),
    "split name on a passage file": (
        lambda t: (["test=" + str(psgs(t, "1\tx\tt"))], []),
        "psgs.tsv", "names no question split"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, case):
    make, name, expected = CASES[case]
    (tmp_path / "in").mkdir()
    inputs, flags = make(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ingest", *map(str, inputs), "--out", str(out), *flags])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert name in lines[0] and expected in lines[0], lines[0]
    assert result.stdout == ""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no staging directory left behind
