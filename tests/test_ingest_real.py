"""`ragkit ingest` on real data: SQuADShifts (Amazon reviews, SQuAD v1.1 format) and SciFact (BEIR).

Counts come from the dataset README and were checked against the files. Skips when the data is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from ragkit import ingest
from ragkit.answers import has_answer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
AMAZON = DATA / "squadshifts_amazon" / "amazon_reviews_v1.0.json"
SCIFACT = DATA / "scifact"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not AMAZON.is_file(), reason=f"{AMAZON} not present")
def test_squadshifts_amazon(tmp_path):
    # Overlapping windows (stride = window / 2), so every answer span shorter than 50 words sits whole in a window.
    manifest = ingest([str(AMAZON)], str(tmp_path / "out"), window=100, stride=50)
    counts = manifest.counts
    assert counts["documents"] == 2050
    assert counts["questions"] == {"train": 9885}
    assert (counts["unanswerable_skipped"], counts["questions_without_positive"], counts["duplicates_dropped"]) == (0, 0, 0)

    passages = datasets.load_from_disk(str(tmp_path / "out" / "passages"))
    assert counts["passages"] == len(passages)
    assert len(set(passages["title"])) == 413  # one title per article
    assert len(set(passages["doc_id"])) == 2050
    text = dict(zip(passages["id"], passages["text"]))
    questions = datasets.load_from_disk(str(tmp_path / "out" / "questions" / "train"))

    contexts = {}
    for article in json.loads(AMAZON.read_text(encoding="utf-8"))["data"]:
        for k, paragraph in enumerate(article["paragraphs"]):
            contexts[f"{article['title']}-{k}"] = paragraph["context"]
    answers = token_mismatches = 0
    for row in questions:
        (doc,) = row["doc_ids"]
        assert all(text[pid] in contexts[doc] for pid in row["positive_ids"])
        for answer in row["answers"]:
            answers += 1
            found = [pid for pid in row["positive_ids"] if has_answer([answer], text[pid])]
            if has_answer([answer], contexts[doc]):
                assert found, (row["id"], answer)
            else:
                # A span cut mid-word ("usingMedelco") cannot match DPR's token test anywhere; it is still there verbatim.
                token_mismatches += 1
                assert any(answer.strip() in text[pid] for pid in row["positive_ids"]), (row["id"], answer)
    assert token_mismatches < 0.02 * answers


@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"{SCIFACT} not present")
def test_scifact_beir(tmp_path):
    manifest = ingest([str(SCIFACT)], str(tmp_path / "out"))
    counts = manifest.counts
    assert counts["documents"] == 5183
    assert counts["questions"] == {"train": 809}
    assert counts["questions_without_positive"] == 0

    questions = datasets.load_from_disk(str(tmp_path / "out" / "questions" / "train"))
    # qrels/train.tsv has 920 lines: a header and 919 judgements (the README's 920 counts the header).
    assert sum(len(ids) for ids in questions["doc_ids"]) == 919
    assert all(set(scores) == {1} for scores in questions["doc_scores"])
    passages = datasets.load_from_disk(str(tmp_path / "out" / "passages"))
    windows = {}
    for pid, doc in zip(passages["id"], passages["doc_id"]):
        windows.setdefault(doc, []).append(pid)
    assert len(windows) == 5183 and counts["passages"] == len(passages)
    for row in questions:
        assert row["positive_ids"] == [pid for doc in row["doc_ids"] for pid in windows[doc]]
