"""In-memory records, for notebooks: a pandas DataFrame (anything with ``.to_dict("records")``) or a list of
dicts, with the columns of simpletransformers' retrieval models.

* ``query_text``: the question;
* ``gold_passage``: the text of its gold passage, and ``title``, that passage's title (optional);
* ``hard_negative`` (optional): the text of a hard negative, or a list of them;
* ``answers`` (optional): an answer string or a list of them.

Each distinct gold passage (title + text) becomes a document whose id is a hash of its content, so the
same passage gets the same id in every split and every run; each row becomes a question whose positive is
that passage (narrowed to the windows holding an answer when the passage is cut, as for any named gold
passage). Hard negatives become documents too (a text that is also a gold passage is that passage) and the
question's given hard negatives (``ragkit mine --given-negatives``). pandas is never imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any, Iterator

from ..config import IngestConfig
from ..errors import RagkitError
from .sources import Document, Judgement, Question, ReadOptions, Source, unique

COLUMNS = ("query_text", "gold_passage", "title", "hard_negative", "answers")
_FIX = "records need query_text and gold_passage; title, hard_negative and answers are optional"


def is_records(value: Any) -> bool:
    """A DataFrame-like object (``to_dict``) or a non-empty list / tuple of dicts."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(item, dict) for item in value)
    return not isinstance(value, (str, bytes, dict, os.PathLike)) and callable(getattr(value, "to_dict", None))


def sort_arguments(inputs: Any, options: dict[str, Any]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """``ragkit.ingest``'s arguments as (file inputs, records by split, config settings).

    ``inputs`` is a path, a list of paths (``split=path`` names a question file's split) or records (the train
    split). A keyword that is no :class:`IngestConfig` setting names a split; its value is records or a path.
    """
    settings = {f.name for f in dataclasses.fields(IngestConfig)} - {"inputs", "out"}
    paths: list[str] = []
    frames: dict[str, Any] = {}
    if is_records(inputs):
        frames["train"] = inputs
    elif isinstance(inputs, (str, os.PathLike)):
        paths.append(os.fspath(inputs))
    elif inputs is not None:
        for item in inputs:
            if not isinstance(item, (str, os.PathLike)):
                raise RagkitError(f"inputs: {type(item).__name__} among the paths (pass paths, or records such as a "
                                  "DataFrame or a list of dicts)")
            paths.append(os.fspath(item))
    given = {}
    for key, value in options.items():
        if key in settings:
            given[key] = value
        elif is_records(value):
            if key in frames:
                raise RagkitError(f"{key}: records given twice for this split (pass them once)")
            frames[key] = value
        elif isinstance(value, (str, os.PathLike)):
            paths.append(f"{key}={os.fspath(value)}")
        else:
            raise RagkitError(f"{key}={type(value).__name__}: neither an ingest setting nor records or a file for a split "
                              f"named {key!r} (settings: {', '.join(sorted(settings))})")
    return paths, frames, given


def content_id(title: str, text: str) -> str:
    """A passage id from its content: the same title and text give the same id."""
    return hashlib.blake2b(f"{title}\x1f{text}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _missing(value: Any) -> bool:
    """None, NaN, or a missing value of pandas (NA, NaT) when pandas is in use."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    pandas = sys.modules.get("pandas")
    return pandas is not None and not hasattr(value, "__len__") and pandas.isna(value) is True


def _texts(value: Any, name: str, where: str) -> list[str]:
    """A string or a list of strings (a numpy array too) as a list; missing values as none."""
    if _missing(value):
        return []
    if isinstance(value, str):
        return [value]
    items = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(items, (list, tuple)):
        items = [item for item in items if not _missing(item)]
        if all(isinstance(item, str) for item in items):
            return items
    raise RagkitError(f"{where}: '{name}' must be a string or a list of strings")


def _text(record: dict, name: str, where: str, required: bool) -> str:
    value = record.get(name)
    if _missing(value):
        if required:
            raise RagkitError(f"{where}: missing '{name}' ({_FIX})")
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise RagkitError(f"{where}: '{name}' must be a non-empty string ({_FIX})")
    return value


@dataclasses.dataclass
class _Row:
    question: str
    gold: tuple[str, str]
    """(title, text)"""
    negatives: list[str]
    answers: list[str]
    where: str


class Frames(Source):
    """Records per split, read when given (they are in memory already)."""

    role = "passages+questions"
    holds_passages = True

    def __init__(self, frames: dict[str, Any], options: ReadOptions) -> None:
        super().__init__("in-memory records", None, options)
        self.rows: dict[str, list[_Row]] = {}
        for split, frame in frames.items():
            records = frame.to_dict("records") if not isinstance(frame, (list, tuple)) else list(frame)
            if not records:
                raise RagkitError(f"in-memory '{split}' records: empty (pass at least one row)")
            self.rows[split] = [self._row(record, f"in-memory '{split}' records, row {i}") for i, record in enumerate(records)]
        self.golds: dict[str, tuple[str, str, str]] = {}
        """Text -> (id, title, text) of the first gold passage with that text: a hard negative with it is that passage."""
        for rows in self.rows.values():
            for row in rows:
                self.golds.setdefault(row.gold[1], (content_id(*row.gold), *row.gold))

    @staticmethod
    def _row(record: Any, where: str) -> _Row:
        if not isinstance(record, dict):
            raise RagkitError(f"{where}: a {type(record).__name__}, expected a dict of columns ({_FIX})")
        return _Row(_text(record, "query_text", where, True),
                    (_text(record, "title", where, False), _text(record, "gold_passage", where, True)),
                    _texts(record.get("hard_negative"), "hard_negative", where),
                    _texts(record.get("answers"), "answers", where), where)

    def _negative(self, text: str) -> tuple[str, str, str]:
        """``(id, title, text)`` of a hard negative."""
        return self.golds.get(text) or (content_id("", text), "", text)

    def manifest_inputs(self) -> list[dict[str, Any]]:
        inputs = []
        for split, rows in self.rows.items():
            content = json.dumps([[r.question, *r.gold, r.negatives, r.answers] for r in rows], ensure_ascii=False)
            digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
            inputs.append({"kind": "memory", "role": self.role, "split": split, "rows": len(rows), "sha256": f"sha256:{digest}"})
        return inputs

    def questions(self) -> list[Question]:
        out = []
        for split, rows in self.rows.items():
            for row in rows:
                gold = content_id(*row.gold)
                negatives = [n for n in unique(self._negative(text)[0] for text in row.negatives) if n != gold]
                out.append(Question(None, row.question, row.answers, split, row.where, gold=[gold],
                                    hard_negatives=negatives, judged=[Judgement(gold, 1, row.where)]))
        return out

    def documents(self) -> Iterator[Document]:
        seen: set[str] = set()
        for rows in self.rows.values():
            for row in rows:
                for doc_id, title, text in [(content_id(*row.gold), *row.gold), *map(self._negative, row.negatives)]:
                    if doc_id not in seen:
                        seen.add(doc_id)
                        yield Document(doc_id, title, text, self.path, None)
