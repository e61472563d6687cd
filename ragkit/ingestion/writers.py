"""Writing the ingest artifact: passages streamed shard by shard, repeated ids caught in bounded memory,
question splits saved as ``datasets`` directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm

from ..errors import RagkitError, located
from .sources import Document
from .windows import Windows, passage_ids, window_ranges

PASSAGE_COLUMNS = ("id", "title", "text", "doc_id")
QUESTION_COLUMNS = ("id", "question", "answers", "positive_ids", "hard_negative_ids", "doc_ids", "doc_scores")

_BATCH = 2048
"""Documents windowed, checked for repeated ids and written together."""
_SHARD_CHARS = 400_000_000
"""Passage text per Arrow shard (about the 500 MB shards ``save_to_disk`` makes)."""


def passage_features() -> datasets.Features:
    return datasets.Features({name: datasets.Value("string") for name in PASSAGE_COLUMNS})


def question_features() -> datasets.Features:
    strings = datasets.Sequence(datasets.Value("string"))
    return datasets.Features({
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": strings,
        "positive_ids": strings,
        "hard_negative_ids": strings,
        "doc_ids": strings,
        "doc_scores": datasets.Sequence(datasets.Value("int64")),
    })


class DigestSet:
    """A set of 16-byte digests held as sorted numpy runs: 16 bytes a member, no object per member.

    A new batch becomes a run, and runs merge while the newest is at least as long as the one before, so
    there are O(log n) runs to search and each digest is re-sorted O(log n) times.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)  # (K,)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[at] == digests
        return found

    def add(self, digests: np.ndarray) -> None:
        """Add digests that are not members yet."""
        if len(digests) == 0:
            return
        self._runs.append(np.unique(digests))
        while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
            newest = self._runs.pop()
            # Both runs are sorted; a stable sort of their concatenation is a linear merge (timsort).
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newest]), kind="stable")


def digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence the progress bars ``datasets`` shows while saving a few rows."""
    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


class PassageWriter:
    """Writes passages shard by shard straight into the layout ``Dataset.save_to_disk`` produces.

    Building a ``Dataset`` and saving it would write every passage twice and read the first copy back
    through a memory map, which makes the whole corpus resident. Only the two small metadata files are
    taken from ``save_to_disk`` itself (of an empty dataset with the same features).
    """

    def __init__(self, directory: Path, shard_chars: int = _SHARD_CHARS) -> None:
        self.directory = directory
        self.shard_chars = shard_chars
        self.features = passage_features()
        self.shards: list[Path] = []
        self.rows = 0
        self._writer: ArrowWriter | None = None
        self._chars = 0
        directory.mkdir()

    def write(self, columns: dict[str, list[str]]) -> None:
        if not columns["id"]:
            return
        if self._writer is None:
            self.shards.append(self.directory / f"part-{len(self.shards):05d}.arrow")
            self._writer = ArrowWriter(features=self.features, path=str(self.shards[-1]))
        self._writer.write_batch(columns)
        self.rows += len(columns["id"])
        self._chars += sum(map(len, columns["text"]))
        if self._chars >= self.shard_chars:
            self._end_shard()

    def _end_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer, self._chars = None, 0

    def close(self) -> None:
        self._end_shard()
        names = [f"data-{i:05d}-of-{len(self.shards):05d}.arrow" for i in range(len(self.shards))]
        for part, name in zip(self.shards, names):
            part.rename(self.directory / name)
        template = self.directory.parent / f".{self.directory.name}-template"
        with quiet_datasets():
            empty = datasets.Dataset.from_dict({name: [] for name in PASSAGE_COLUMNS}, features=self.features)
            empty.save_to_disk(str(template))
        state = json.loads((template / datasets.config.DATASET_STATE_JSON_FILENAME).read_text(encoding="utf-8"))
        state["_data_files"] = [{"filename": name} for name in names]
        (self.directory / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(
            json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = datasets.config.DATASET_INFO_FILENAME
        shutil.copyfile(template / info, self.directory / info)
        shutil.rmtree(template)


@dataclasses.dataclass
class CorpusCounts:
    documents: int = 0
    passages: int = 0
    documents_windowed: int = 0
    max_windows_per_document: int = 0
    duplicates_dropped: int = 0


def write_passages(documents: Iterable[Document], directory: Path, wanted: dict[str, bool], window: int,
                    stride: int, dedup: bool) -> tuple[dict[str, Windows], CorpusCounts]:
    """Window and write every document; return the windows of the ``wanted`` ones and the counts.

    ``wanted`` maps a document id to whether its window texts are needed too. A document is a repeat when
    its id was seen, or when one of its passage ids equals an earlier passage id (a source id such as
    ``a#1`` against the second window of ``a``); only ids holding ``#`` can collide that second way.
    """
    seen, writer, counts = DigestSet(), PassageWriter(directory), CorpusCounts()
    found: dict[str, Windows] = {}
    with tqdm(desc="ingest", unit=" docs", disable=None) as progress:
        for batch in _batched(documents, _BATCH):
            windowed = []
            for doc in batch:
                if not doc.doc_id:
                    raise located(doc.path, doc.line, "empty passage id (give every passage an id)")
                ranges = window_ranges(doc.text, window, stride)
                ids = passage_ids(doc.doc_id, len(ranges))
                keys = ["d" + doc.doc_id] + ["p" + pid for pid in ids if "#" in pid]
                windowed.append((doc, ranges, ids, keys))
            digests = [digest(key) for _, _, _, keys in windowed for key in keys]
            known = seen.contains(np.array(digests, dtype="S16"))
            fresh: set[bytes] = set()
            columns: dict[str, list[str]] = {name: [] for name in PASSAGE_COLUMNS}
            at = 0
            for doc, ranges, ids, keys in windowed:
                mine = digests[at:at + len(keys)]
                repeats = [k for k, d, old in zip(keys, mine, known[at:at + len(keys)]) if old or d in fresh]
                at += len(keys)
                if repeats:
                    if doc.repeatable:
                        continue
                    if dedup:
                        counts.duplicates_dropped += 1
                        continue
                    raise located(doc.path, doc.line, f"duplicate passage id '{repeats[0][1:]}' (ids must be unique; "
                                  "remove the repeat or pass --dedup to keep the first)")
                fresh.update(mine)
                texts = [doc.text[s:e] for s, e in ranges]
                columns["id"] += ids
                columns["title"] += [doc.title] * len(ids)
                columns["text"] += texts
                columns["doc_id"] += [doc.doc_id] * len(ids)
                if doc.doc_id in wanted:
                    keep_texts = wanted[doc.doc_id] and len(ids) > 1
                    found[doc.doc_id] = Windows(ids, ranges, texts if keep_texts else None)
                counts.documents += 1
                counts.passages += len(ids)
                counts.documents_windowed += int(len(ids) > 1)
                counts.max_windows_per_document = max(counts.max_windows_per_document, len(ids))
            seen.add(np.array(list(fresh), dtype="S16"))
            writer.write(columns)
            progress.update(len(batch))
    if writer.rows == 0:
        raise RagkitError("no passages in the inputs (add a corpus: a DPR passage tsv, a BEIR or MS MARCO directory, "
                          "an MS MARCO collection.tsv, SQuAD or jsonl passages)")
    writer.close()
    return found, counts


def save_questions(rows: list[dict[str, Any]], directory: Path) -> None:
    columns = {name: [row[name] for row in rows] for name in QUESTION_COLUMNS}
    with quiet_datasets():
        datasets.Dataset.from_dict(columns, features=question_features()).save_to_disk(str(directory))


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
