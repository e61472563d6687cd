"""In-memory records (simpletransformers columns) through `ragkit.ingest`: lists of dicts and DataFrames."""

from __future__ import annotations

import datasets
import pytest

from ragkit import ingest, mine
from ragkit.errors import RagkitError

ARMSTRONG = "Neil Armstrong was the first person to walk on the Moon in July 1969 during Apollo 11."
GAGARIN = "Yuri Gagarin was the first human to journey into outer space, in April 1961."
TERESHKOVA = "Valentina Tereshkova was the first woman to fly to space, in June 1963."

TRAIN = [
    {"query_text": "who first walked on the moon", "gold_passage": ARMSTRONG, "title": "Neil Armstrong",
     "hard_negative": GAGARIN, "answers": ["Neil Armstrong"]},
    {"query_text": "when did apollo 11 land", "gold_passage": ARMSTRONG, "title": "Neil Armstrong",
     "hard_negative": [TERESHKOVA, ARMSTRONG]},  # its own gold passage is no negative
    {"query_text": "first human in space", "gold_passage": GAGARIN, "title": "Yuri Gagarin"},
]
DEV = [{"query_text": "first woman in space", "gold_passage": TERESHKOVA, "title": "Valentina Tereshkova",
        "hard_negative": ARMSTRONG, "answers": "Valentina Tereshkova"}]


def load(out, name):
    return datasets.load_from_disk(str(out / name))


def test_list_of_dicts_by_split(tmp_path):
    manifest = ingest(train=TRAIN, dev=DEV, out=tmp_path / "out")
    passages = load(tmp_path / "out", "passages").to_list()
    by_text = {p["text"]: p for p in passages}
    # three distinct gold passages; Gagarin's and Tereshkova's texts are also gold passages, so their negatives are them
    assert len(passages) == 3 and set(by_text) == {ARMSTRONG, GAGARIN, TERESHKOVA}
    assert {p["title"] for p in passages} == {"Neil Armstrong", "Yuri Gagarin", "Valentina Tereshkova"}
    ids = {text: p["id"] for text, p in by_text.items()}
    train = load(tmp_path / "out", "questions/train").to_list()
    assert [(q["id"], q["question"], q["answers"]) for q in train] == [
        ("train-0", "who first walked on the moon", ["Neil Armstrong"]), ("train-1", "when did apollo 11 land", []),
        ("train-2", "first human in space", [])]
    assert [q["positive_ids"] for q in train] == [[ids[ARMSTRONG]], [ids[ARMSTRONG]], [ids[GAGARIN]]]
    assert [q["hard_negative_ids"] for q in train] == [[ids[GAGARIN]], [ids[TERESHKOVA]], []]
    assert [(q["doc_ids"], q["doc_scores"]) for q in train] == [([ids[ARMSTRONG]], [1])] * 2 + [([ids[GAGARIN]], [1])]
    dev = load(tmp_path / "out", "questions/dev").to_list()
    assert dev[0]["answers"] == ["Valentina Tereshkova"] and dev[0]["hard_negative_ids"] == [ids[ARMSTRONG]]

    assert manifest.config["inputs"] == []
    assert [(i["kind"], i["split"], i["rows"]) for i in manifest.inputs] == [("memory", "train", 3), ("memory", "dev", 1)]
    again = ingest(train=list(reversed(TRAIN)), dev=DEV, out=tmp_path / "again")
    assert {p["text"]: p["id"] for p in load(tmp_path / "again", "passages")} == ids  # ids come from the content
    assert again.inputs[0]["sha256"] != manifest.inputs[0]["sha256"]  # another order, another content hash
    assert ingest(TRAIN, out=tmp_path / "same").inputs[0]["sha256"] == manifest.inputs[0]["sha256"]  # positional: train


def test_hard_negatives_become_passages_and_given_negatives(tmp_path):
    other = "The Space Shuttle flew 135 missions between 1981 and 2011."
    rows = [{"query_text": "who first walked on the moon", "gold_passage": ARMSTRONG, "title": "Neil Armstrong",
             "hard_negative": other}]
    ingest(rows, out=tmp_path / "out", window=0)
    passages = {p["text"]: p for p in load(tmp_path / "out", "passages")}
    assert passages[other]["title"] == ""
    question = load(tmp_path / "out", "questions/train")[0]
    assert question["hard_negative_ids"] == [passages[other]["id"]]
    mine(str(tmp_path / "out"), str(tmp_path / "mine"), given_negatives="only", negatives=3)
    assert load(tmp_path / "mine", "examples/train")[0]["hard_negative_ids"] == [passages[other]["id"]]


def test_cut_gold_passage_keeps_the_windows_with_the_answer(tmp_path):
    text = " ".join(f"w{i}" for i in range(12))
    ingest([{"query_text": "q", "gold_passage": text, "title": "T", "answers": ["w9"]}], out=tmp_path / "out", window=4)
    positive = load(tmp_path / "out", "questions/train")[0]["positive_ids"]
    assert len(positive) == 1 and positive[0].endswith("#2")


class Records:
    """Not pandas: anything with ``to_dict("records")`` is accepted."""

    def __init__(self, rows):
        self.rows = rows

    def to_dict(self, orient):
        assert orient == "records"
        return list(self.rows)


def test_any_object_with_to_dict_records(tmp_path):
    one = ingest(train=Records(TRAIN), out=tmp_path / "a")
    two = ingest(train=TRAIN, out=tmp_path / "b")
    assert one.inputs == two.inputs
    assert load(tmp_path / "a", "questions/train").to_list() == load(tmp_path / "b", "questions/train").to_list()


def test_pandas_dataframe_with_missing_values(tmp_path):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(TRAIN)  # missing hard_negative / answers become NaN
    assert frame["answers"].isna().sum() == 2
    ingest(train=frame, dev=pandas.DataFrame(DEV), out=tmp_path / "frame")
    ingest(train=TRAIN, dev=DEV, out=tmp_path / "dicts")
    for name in ("passages", "questions/train", "questions/dev"):
        assert load(tmp_path / "frame", name).to_list() == load(tmp_path / "dicts", name).to_list()


def test_records_may_sit_beside_files(tmp_path):
    psgs = tmp_path / "psgs.tsv"
    psgs.write_text("id\ttext\ttitle\nx1\tan unrelated passage\tOther\n", encoding="utf-8")
    manifest = ingest([str(psgs)], out=tmp_path / "out", train=TRAIN)
    assert manifest.counts["passages"] == 4
    assert [i["kind"] for i in manifest.inputs] == ["file", "memory"]


@pytest.mark.parametrize("call, message", [
    (lambda out: ingest(train=[{"gold_passage": "x"}, {"query_text": "q"}], out=out),
     "in-memory 'train' records, row 0: missing 'query_text'"),
    (lambda out: ingest(train=[{"query_text": "q", "gold_passage": "x"}, {"query_text": "q"}], out=out),
     "in-memory 'train' records, row 1: missing 'gold_passage'"),
    (lambda out: ingest(dev=[{"query_text": "q", "gold_passage": "x", "hard_negative": 3}], out=out),
     "in-memory 'dev' records, row 0: 'hard_negative' must be a string or a list of strings"),
    (lambda out: ingest(train=[{"query_text": "q", "gold_passage": "x"}], windw=3, out=out),
     "windw=int: neither an ingest setting nor records or a file"),
    (lambda out: ingest([{"query_text": "q", "gold_passage": "x"}], train=TRAIN, out=out), "train: records given twice"),
    (lambda out: ingest(train=Records([]), out=out), "in-memory 'train' records: empty"),
])
def test_bad_records_are_one_line_errors(tmp_path, call, message):
    with pytest.raises(RagkitError) as error:
        call(tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_out_is_required():
    with pytest.raises(TypeError, match="out="):
        ingest(train=TRAIN)
