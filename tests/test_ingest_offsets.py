"""SQuAD answers whose `answer_start` is a few characters off: relocated nearby, counted, logged; `--strict` refuses."""

from __future__ import annotations

import json
import logging
import random

import datasets
import pytest

from ragkit import ingest
from ragkit.errors import RagkitError
from ragkit.ingestion.squad import SLACK, relocate_answer

CONTEXT = ("Four coronaviruses cause common colds in people. Besides SARS, the human ones are "
           "HCoV-OC43 and HCoV-229E , HCoV-NL63 and HCoV-HKU1.")


def squad_file(tmp_path, paragraphs, name="train-v1.1.json"):
    """``paragraphs``: (context, [(question id, answer text, answer_start), ...])."""
    path = tmp_path / name
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Art", "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": f"question {qid}?", "answers": [
            {"text": text, "answer_start": start}]} for qid, text, start in qas]}
        for context, qas in paragraphs]}]}))
    return path


def positives(out, split="train"):
    return {row["id"]: row["positive_ids"] for row in datasets.load_from_disk(str(out / "questions" / split))}


def naive_relocation(context, text, start):
    """Every occurrence of the stripped text in the context, the nearest within SLACK of where it should start."""
    core = text.strip()
    expected = start + len(text) - len(text.lstrip())
    found = [i for i in range(len(context)) if context.startswith(core, i) and abs(i - expected) <= SLACK]
    if not core or not found:
        return None
    best = min(found, key=lambda i: (abs(i - expected), i))
    return best, best + len(core)


# --- the relocation itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, start", [
    (" HCoV-OC43 and HCoV-229E", CONTEXT.index("HCoV-OC43")),  # a leading space in the text, offset on the word
    ("HCoV-OC43 and HCoV-229E ", CONTEXT.index("HCoV-OC43") - 1),  # a trailing space, offset on the space before
    ("HCoV-OC43", CONTEXT.index("HCoV-OC43") - 3),  # off by three, before
    ("HCoV-OC43", CONTEXT.index("HCoV-OC43") + 3),  # off by three, after
    (" HCoV-229E ", CONTEXT.index("HCoV-229E") + 2),  # spaces on both sides and off by three
])
def test_off_by_a_few_characters_is_relocated_to_the_text(text, start):
    assert CONTEXT[start:start + len(text)] != text
    begin = CONTEXT.index(text.strip())
    assert relocate_answer(CONTEXT, text, start) == (begin, begin + len(text.strip()))


def test_the_nearest_occurrence_wins_and_the_text_must_be_near():
    context = "apple pie and " + "x" * 20 + " apple juice"
    second = context.rindex("apple")
    assert relocate_answer(context, "apple", second - 3) == (second, second + 5)
    assert relocate_answer(context, "apple", 4) == (0, 5)
    assert relocate_answer(context, "pear", 4) is None
    far = "apple" + " " * (SLACK + 1) + "x"
    assert relocate_answer(far, "apple", SLACK + 1) is None  # SLACK + 1 away
    assert relocate_answer(far, "apple", SLACK) == (0, 5)


def test_relocation_matches_a_naive_search():
    rng = random.Random(0)
    for _ in range(2000):
        context = "".join(rng.choice("ab ") for _ in range(rng.randrange(1, 120)))
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(1, 5)))
        start = rng.randrange(0, len(context) + 3)
        if context[start:start + len(text)] == text:
            continue
        there = context[start:start + len(text)]
        expected = relocate_answer(context, text, start)
        if text.strip() and there.strip() == text.strip():  # the stripped comparison at the offset comes first
            at = start + len(there) - len(there.lstrip())
            assert expected == (at, at + len(text.strip()))
        else:
            assert expected == naive_relocation(context, text, start), (context, text, start)


# --- through ingest -----------------------------------------------------------------------------------


def test_relocations_are_counted_and_logged(tmp_path, caplog):
    hcov = CONTEXT.index("HCoV-OC43")
    path = squad_file(tmp_path, [(CONTEXT, [
        ("exact", "HCoV-OC43", hcov),
        ("lead", " HCoV-OC43 and HCoV-229E", hcov),
        ("three", "HCoV-NL63", CONTEXT.index("HCoV-NL63") - 3),
        ("trail", "colds ", CONTEXT.index("colds") + 1),
    ])])
    with caplog.at_level(logging.WARNING, logger="ragkit.ingestion"):
        manifest = ingest([str(path)], str(tmp_path / "out"), window=0)
    assert manifest.counts["answers_relocated"] == 3
    assert manifest.config["strict"] is False
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and "question 'lead'" in logged[0] and f"answer_start={hcov}" in logged[0]
    assert all(p == ["Art-0"] for p in positives(tmp_path / "out").values())


def test_only_the_first_relocations_are_logged(tmp_path, caplog):
    path = squad_file(tmp_path, [(CONTEXT, [(f"q{i}", "HCoV-NL63", CONTEXT.index("HCoV-NL63") - 1) for i in range(8)])])
    with caplog.at_level(logging.WARNING, logger="ragkit.ingestion"):
        manifest = ingest([str(path)], str(tmp_path / "out"), window=0)
    assert manifest.counts["answers_relocated"] == 8
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 6 and logged[-1].endswith("8 answers relocated in all (the first 5 shown)")


def test_windows_follow_the_relocated_span(tmp_path):
    words = " ".join(f"w{i}" for i in range(12))  # windows of 4 words: w0-w3 | w4-w7 | w8-w11
    repeated = "apple w1 w2 w3 w4 apple w6 w7"  # windows of 4: apple at 0 in #0, at 18 in #1
    path = squad_file(tmp_path, [
        (words, [("late", "w8", words.index("w8") - 3), ("on-time", "w8", words.index("w8"))]),
        (repeated, [("second", "apple", repeated.rindex("apple") - 3), ("first", "apple", 5)]),
    ])
    manifest = ingest([str(path)], str(tmp_path / "out"), window=4)
    assert manifest.counts["answers_relocated"] == 3
    assert positives(tmp_path / "out") == {
        "late": ["Art-0#2"],  # the offset lies in window #1, the text in #2
        "on-time": ["Art-0#2"],
        "second": ["Art-1#1"],  # the occurrence nearest the offset
        "first": ["Art-1#0"],
    }


def test_text_absent_near_its_offset_is_an_error_naming_the_question(tmp_path):
    far = "apple" + " filler" * 10 + " pear"
    path = squad_file(tmp_path, [(far, [("ok", "apple", 1), ("q42", "pear", 1)])])
    with pytest.raises(RagkitError) as error:
        ingest([str(path)], str(tmp_path / "out"), window=0)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: question 'q42': answer 'pear' does not match its context at answer_start=1")
    assert not (tmp_path / "out").exists()


def test_strict_refuses_the_first_misaligned_answer(tmp_path):
    hcov = CONTEXT.index("HCoV-OC43")
    path = squad_file(tmp_path, [(CONTEXT, [("exact", "HCoV-OC43", hcov), ("lead", " HCoV-OC43", hcov),
                                            ("three", "HCoV-NL63", CONTEXT.index("HCoV-NL63") - 3)])])
    with pytest.raises(RagkitError, match=r"question 'lead': answer ' HCoV-OC43' does not match its context at "
                                          rf"answer_start={hcov} \(the context there reads 'HCoV-OC43 '\); fix"):
        ingest([str(path)], str(tmp_path / "out"), window=0, strict=True)
    assert not (tmp_path / "out").exists()
    assert ingest([str(path)], str(tmp_path / "out"), window=0).counts["answers_relocated"] == 2
