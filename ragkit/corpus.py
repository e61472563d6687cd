"""``ragkit ingest``: raw corpora and QA sets -> passages + questions (the ingest artifact).

Readers cover the formats retrieval data already ships in:

* DPR: the passage tsv (header ``id<TAB>text<TAB>title``, e.g. ``psgs_w100.tsv``), the retriever JSON (a
  list of ``{question, answers, positive_ctxs, hard_negative_ctxs, negative_ctxs}``) and the ``qas`` tsv
  (``question<TAB>['answer', ...]``, no header). A retriever JSON given without any other corpus brings
  its own: the ctxs it names.
* BEIR: a directory with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; the questions of
  a split are the queries its qrels judge.
* SQuAD v1.1 / v2.0 JSON: every paragraph is a document, every answerable question a question.
* jsonl with configurable field names: a line with the text field is a passage, a line with the question
  field a question.

Any of these files may be gzip-compressed (``psgs_w100.tsv.gz``, ``nq-train.json.gz``): a ``.gz`` suffix is
read through ``gzip`` and the format comes from the suffix before it.

Documents are cut DPR-style into windows of ``window`` words starting every ``stride`` words. A window is
the verbatim slice of its document from its first word to its last, and keeps the document's title in the
``title`` column. A document that fits one window keeps its id; a longer one gives ``{doc_id}#{k}``.
A question's positives follow its evidence: the windows holding a whole answer span (SQuAD), every window
of a document judged relevant (BEIR), or a named gold passage (DPR JSON, jsonl), narrowed to the windows
that contain an answer when that passage was cut.

The corpus streams through in bounded memory. Questions are read first (they are small) and name the
few documents whose windows must be remembered; passages go shard by shard straight into the layout
``Dataset.save_to_disk`` writes; repeated ids are caught with sorted arrays of 16-byte digests instead of
a set of strings.
"""

from __future__ import annotations

import ast
import codecs
import collections
import csv
import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import random
import re
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm

from .answers import has_answer
from .artifacts import Manifest, file_input, staged_output
from .config import IngestConfig, as_dict
from .errors import RagkitError, located

PASSAGE_COLUMNS = ("id", "title", "text", "doc_id")
QUESTION_COLUMNS = ("id", "question", "answers", "positive_ids", "hard_negative_ids", "doc_ids", "doc_scores")
FORMATS = ("dpr-passages", "dpr-qas", "dpr-json", "beir", "squad", "jsonl")
"""What :func:`detect_format` tells apart (``--format dpr`` covers the first three)."""

_BATCH = 2048
"""Documents windowed, checked for repeated ids and written together."""
_SHARD_CHARS = 400_000_000
"""Passage text per Arrow shard (about the 500 MB shards ``save_to_disk`` makes)."""
_READ_CHUNK = 1 << 20
_MAX_JSON_ITEM_CHARS = 1 << 28
"""A retriever-JSON item still unparsed at this size is malformed, not merely unread."""
_SPLIT_IN_NAME = re.compile(r"(?<![a-z])(train|dev|test|validation)(?![a-z])")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
_NON_SPACE = re.compile(r"\S")
_CTX_ID_FIELDS = ("passage_id", "psg_id", "id")
_CTX_KINDS = ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs")


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


# --- windows and ids -------------------------------------------------------------------------------


def window_ranges(text: str, window: int, stride: int) -> list[tuple[int, int]]:
    """Character ranges ``(start, end)`` of the word windows of ``text``.

    A window holds ``window`` words and windows start every ``stride`` words; the last one ends at the
    last word (it may be shorter). ``window == 0`` or a text of at most ``window`` words gives one range,
    the text without its surrounding white space. A text without words gives ``[(0, 0)]``.
    """
    first = _NON_SPACE.search(text)
    if first is None:
        return [(0, 0)]
    if window == 0:
        return [(first.start(), len(text.rstrip()))]
    # Regexes step over whole windows in C; a match object per word would cost most of the ingest time.
    span, step = _window_patterns(window, stride)
    ranges = []
    start = first.start()
    while True:
        end = span.match(text, start).end()
        ranges.append((start, end))
        if _NON_SPACE.search(text, end) is None:
            return ranges
        start = step.match(text, start).end()


@functools.lru_cache(maxsize=8)
def _window_patterns(window: int, stride: int) -> tuple[re.Pattern, re.Pattern]:
    """From the first word of a window: up to ``window`` words, and ``stride`` words with the space after."""
    return re.compile(rf"\S+(?:\s+\S+){{0,{window - 1}}}"), re.compile(rf"(?:\S+\s+){{{stride}}}")


def passage_ids(doc_id: str, count: int) -> list[str]:
    """Ids of a document's ``count`` windows: the document id itself when there is one window."""
    return [doc_id] if count == 1 else [f"{doc_id}#{k}" for k in range(count)]


def infer_split(path: str | Path) -> str:
    """The split a question file's name announces (train, dev, test, validation); 'train' otherwise."""
    match = _SPLIT_IN_NAME.search(Path(path).name.lower())
    return match.group(1) if match else "train"


def carve_dev(question_documents: Sequence[Sequence[str]], fraction: float, seed: int) -> list[bool]:
    """Choose dev questions so that no dev question shares a document with a train question.

    Questions that share a document (directly or through a chain of others) form one group, and whole
    groups move to dev, in an order shuffled by ``seed``, while that brings the dev size closer to
    ``fraction`` of all questions. Returns one flag per question: True for dev.
    """
    parent = list(range(len(question_documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, documents in enumerate(question_documents):
        for doc in documents:
            j = first_with.setdefault(doc, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(question_documents)):
        groups[root(i)].append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = fraction * len(question_documents)
    dev = [False] * len(question_documents)
    size = 0
    for members in order:
        if abs(size + len(members) - target) < abs(size - target):
            size += len(members)
            for i in members:
                dev[i] = True
    return dev


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# --- reading files ----------------------------------------------------------------------------------


def _not_utf8(path: Path, line: int | None) -> RagkitError:
    return located(path, line, "not valid UTF-8 (re-encode the file as UTF-8, e.g. with iconv)")


@contextmanager
def _open_bytes(path: Path) -> Iterator[Any]:
    """The file's bytes, decompressed when its name ends in ``.gz``; a broken gzip stream is a one-line error."""
    if path.suffix.lower() != ".gz":
        with open(path, "rb") as handle:
            yield handle
        return
    try:
        with gzip.open(path, "rb") as handle:
            yield handle
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise located(path, None, f"is not a readable gzip file ({exc or 'truncated'}); re-download it or "
                      "decompress it and pass the plain file") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file (line end included)."""
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, number) from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _first_bad_utf8_line(path: Path) -> int | None:
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


@contextmanager
def _csv_fields_unbounded() -> Iterator[None]:
    # A long document is one tsv field; csv refuses fields over 128 KiB by default.
    previous = csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-blank tab-separated record, with DPR's quoting (``"``)."""
    lines = (text for _, text in _lines(path))
    with _csv_fields_unbounded():
        reader = csv.reader(lines, delimiter="\t")
        start = 1
        try:
            for row in reader:
                if row:
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as exc:
            raise located(path, start, f"malformed tsv record ({exc}); fix its quoting") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line, object)`` of each non-blank line; an empty file is an error."""
    empty = True
    for number, text in _lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise located(path, number, f"malformed JSON ({exc.msg}, column {exc.colno}); fix the line") from None
        if not isinstance(record, dict):
            raise located(path, number, "expected a JSON object on each line")
        empty = False
        yield number, record
    if empty:
        raise located(path, None, "empty input: no JSON lines (pass a non-empty file)")


def _load_json(path: Path) -> Any:
    with _open_bytes(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data.count(b"\n", 0, exc.start) + 1) from None
    if not text.strip():
        raise located(path, None, "empty input: the file holds no JSON (pass a non-empty file)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise located(path, exc.lineno, f"malformed JSON ({exc.msg}, column {exc.colno}); fix the file") from None


def _json_array_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, item)`` for each item of a file holding one JSON list, parsed one item at a time.

    DPR retriever files reach gigabytes, mostly ctx texts; loading one whole would hold them all at once.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    line, counted = 1, 0  # line number of buf[counted]

    def line_at(i: int) -> int:
        nonlocal line, counted
        if i >= counted:
            line += buf.count("\n", counted, i)
        else:
            line -= buf.count("\n", i, counted)
        counted = i
        return line

    def more(at_least: int = 0) -> None:
        nonlocal buf, pos, eof, counted
        if pos > _READ_CHUNK:  # drop what is parsed; the line count moves with it
            line_at(pos)
            buf, counted, pos = buf[pos:], 0, 0
        raw = handle.read(max(at_least, _READ_CHUNK))
        try:
            buf += utf8.decode(raw, final=not raw)
        except UnicodeDecodeError:
            raise _not_utf8(path, _first_bad_utf8_line(path)) from None
        eof = not raw

    def skip_space() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf) or eof:
                return
            more()

    with _open_bytes(path) as handle:
        skip_space()
        if pos == len(buf):
            raise located(path, None, "empty input: the file holds no JSON (pass a non-empty file)")
        if buf[pos] != "[":
            raise located(path, line_at(pos), "expected a JSON list of questions at the top level")
        pos += 1
        first = True
        while True:
            skip_space()
            if pos == len(buf):
                raise located(path, line_at(pos), "the JSON list is not closed (the file is truncated)")
            if buf[pos] == "]":
                pos += 1
                break
            if not first:
                if buf[pos] != ",":
                    raise located(path, line_at(pos), "malformed JSON (expected ',' or ']' after a list item); fix the file")
                pos += 1
                skip_space()
            first = False
            start = line_at(pos)
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as exc:
                    if eof or len(buf) - pos > _MAX_JSON_ITEM_CHARS:
                        raise located(path, line_at(exc.pos), f"malformed JSON ({exc.msg}); fix the file") from None
                more(len(buf) - pos)
            pos = end
            yield start, item
        skip_space()
        if pos < len(buf):
            raise located(path, line_at(pos), "unexpected data after the JSON list; fix the file")


def _id_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _required_id(record: dict, name: str, where: str, fix: str) -> str:
    value = _id_value(record.get(name))
    if not value:
        raise RagkitError(f"{where}: missing field '{name}' ({fix})")
    return value


def _required_text(record: dict, name: str, where: str, fix: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        problem = "missing field" if value is None else "not a string:"
        raise RagkitError(f"{where}: {problem} '{name}' ({fix})")
    return value


def _optional_text(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RagkitError(f"{where}: field '{name}' is not a string (make it a string or drop it)")
    return value


def _string_list(value: Any, name: str, where: str, ids: bool = False) -> list[str]:
    """A list of strings (ids may also be integers); one string stands for a list of one."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        items = [_id_value(v) if ids else v for v in value]
        if all(isinstance(v, str) for v in items):
            return items
    raise RagkitError(f"{where}: field '{name}' must be a list of strings")


# --- questions and documents as read ----------------------------------------------------------------


@dataclasses.dataclass
class _Question:
    """A question as read, its evidence still named by source documents rather than passage ids."""

    id: str | None
    question: str
    answers: list[str]
    split: str
    where: str
    """``file:line`` (or ``file: question 'id'``) for messages."""
    spans: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    """Answer spans: ``(doc_id, start, end)`` character offsets into the document text."""
    gold: list[str] = dataclasses.field(default_factory=list)
    """Source ids of named gold passages."""
    hard_negatives: list[str] = dataclasses.field(default_factory=list)
    judged: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    """``(doc_id, grade, where)`` relevance judgements."""
    judged_windows_positive: bool = False
    """Every window of a document graded > 0 is a positive (BEIR, where judgements are the evidence)."""

    def documents(self) -> list[str]:
        return _unique([d for d, _, _ in self.judged] + [d for d, _, _ in self.spans] + self.gold)


class _Document(NamedTuple):
    doc_id: str
    title: str
    text: str
    path: Path
    line: int | None
    repeatable: bool = False
    """Expected to recur (a DPR ctx shared by questions): repeats are skipped, not errors."""


@dataclasses.dataclass
class _Fields:
    """jsonl field names."""

    id: str
    title: str
    text: str
    question: str
    answers: str
    positives: str


class _Source:
    """One input: the files it covers, the questions it holds, the documents it holds."""

    role = "questions"
    holds_passages = False

    def __init__(self, path: Path, split: str | None, fields: _Fields) -> None:
        self.path, self.split, self.fields = path, split, fields
        self.unanswerable = 0

    def files(self) -> list[tuple[Path, str]]:
        return [(self.path, self.role)]

    def question_split(self) -> str:
        return self.split or infer_split(self.path)

    def questions(self) -> list[_Question]:
        return []

    def documents(self) -> Iterator[_Document]:
        return iter(())


class _DprPassages(_Source):
    role = "passages"
    holds_passages = True

    def documents(self) -> Iterator[_Document]:
        rows = _tsv_rows(self.path)
        header = next(rows, None)
        if header is None:
            raise located(self.path, None, "empty input (expected a header id<TAB>text<TAB>title, then passages)")
        names = [name.strip().lower() for name in header[1]]
        if "id" not in names or "text" not in names:
            raise located(self.path, 1, "the header must name the columns 'id' and 'text' (DPR: id<TAB>text<TAB>title)")
        at_id, at_text = names.index("id"), names.index("text")
        at_title = names.index("title") if "title" in names else None
        empty = True
        for line, row in rows:
            if len(row) != len(names):
                raise located(self.path, line, f"{len(row)} tab-separated fields, the header has {len(names)} "
                              f"({', '.join(names)}); fix the line or its quoting")
            empty = False
            title = row[at_title] if at_title is not None else ""
            yield _Document(row[at_id], title, row[at_text], self.path, line)
        if empty:
            raise located(self.path, None, "empty input: a header but no passages")


class _DprQas(_Source):
    def questions(self) -> list[_Question]:
        split, out = self.question_split(), []
        for line, row in _tsv_rows(self.path):
            fix = "DPR qas lines are question<TAB>['answer', ...]"
            if len(row) != 2:
                raise located(self.path, line, f"{len(row)} tab-separated fields, expected 2 ({fix})")
            try:
                answers = ast.literal_eval(row[1])
            except (ValueError, SyntaxError, TypeError, RecursionError):
                answers = None
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise located(self.path, line, f"the answers field is not a Python list of strings ({fix})")
            if not row[0].strip():
                raise located(self.path, line, "empty question (remove the line)")
            out.append(_Question(None, row[0], _unique(answers), split, f"{self.path}:{line}"))
        if not out:
            raise located(self.path, None, "empty input: no questions (pass a non-empty file)")
        return out


class _DprJson(_Source):
    def _items(self) -> Iterator[tuple[int, dict]]:
        empty = True
        for line, item in _json_array_items(self.path):
            if not isinstance(item, dict):
                raise located(self.path, line, "expected an object {question, answers, positive_ctxs, ...} in the list")
            empty = False
            yield line, item
        if empty:
            raise located(self.path, None, "empty input: the JSON list holds no questions")

    def _ctxs(self, item: dict, kind: str, where: str) -> list[dict]:
        ctxs = item.get(kind) or []
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs):
            raise RagkitError(f"{where}: '{kind}' must be a list of objects")
        return ctxs

    def _ctx_id(self, ctx: dict, kind: str, where: str) -> str:
        for name in _CTX_ID_FIELDS:
            value = _id_value(ctx.get(name))
            if value:
                return value
        raise RagkitError(f"{where}: a '{kind}' entry has no passage_id (gold and negative ctxs need the id of their passage)")

    def questions(self) -> list[_Question]:
        split, out = self.question_split(), []
        for line, item in self._items():
            where = f"{self.path}:{line}"
            text = _required_text(item, "question", where, "each item needs the question text")
            answers = _unique(_string_list(item.get("answers"), "answers", where))
            gold = _unique(self._ctx_id(c, "positive_ctxs", where) for c in self._ctxs(item, "positive_ctxs", where))
            hard = _unique(self._ctx_id(c, "hard_negative_ctxs", where)
                           for c in self._ctxs(item, "hard_negative_ctxs", where))
            out.append(_Question(_id_value(item.get("id")), text, answers, split, where, gold=gold, hard_negatives=hard,
                                 judged=[(g, 1, where) for g in gold]))
        return out

    def documents(self) -> Iterator[_Document]:
        for line, item in self._items():
            where = f"{self.path}:{line}"
            for kind in _CTX_KINDS:
                for ctx in self._ctxs(item, kind, where):
                    text = _required_text(ctx, "text", where, f"every '{kind}' entry needs its passage text")
                    title = _optional_text(ctx, "title", where)
                    yield _Document(self._ctx_id(ctx, kind, where), title, text, self.path, line, repeatable=True)


class _Beir(_Source):
    role = "passages"
    holds_passages = True

    def __init__(self, path: Path, split: str | None, fields: _Fields) -> None:
        super().__init__(path, split, fields)
        self.corpus = path / "corpus.jsonl"
        self.queries = path / "queries.jsonl"
        self.qrels = sorted((path / "qrels").glob("*.tsv"))
        if split is not None:
            wanted = path / "qrels" / f"{split}.tsv"
            if not wanted.is_file():
                known = ", ".join(q.stem for q in self.qrels) or "none"
                raise located(path, None, f"no qrels/{split}.tsv (splits here: {known}); fix the split name")
            self.qrels = [wanted]
        if self.qrels and not self.queries.is_file():
            raise located(path, None, "has qrels but no queries.jsonl (add the queries file)")

    def files(self) -> list[tuple[Path, str]]:
        files = [(self.corpus, "passages")]
        if self.qrels:
            files.append((self.queries, "queries"))
        return files + [(q, "qrels") for q in self.qrels]

    def questions(self) -> list[_Question]:
        if not self.qrels:
            return []
        texts: dict[str, str] = {}
        for line, record in _jsonl_records(self.queries):
            where = f"{self.queries}:{line}"
            query_id = _required_id(record, "_id", where, "BEIR queries are {_id, text}")
            texts.setdefault(query_id, _required_text(record, "text", where, "BEIR queries are {_id, text}"))
        out = []
        for qrels in self.qrels:
            by_query: dict[str, _Question] = {}
            for line, text in _lines(qrels):
                row = text.rstrip("\r\n").split("\t")
                if row == [""] or (line == 1 and row[0] == "query-id"):
                    continue
                where = f"{qrels}:{line}"
                if len(row) != 3:
                    raise RagkitError(f"{where}: {len(row)} tab-separated fields, expected query-id<TAB>corpus-id<TAB>score")
                query_id, doc_id, grade = row
                try:
                    score = int(grade)
                except ValueError:
                    raise RagkitError(f"{where}: score {grade!r} is not an integer (qrels grades are integers)") from None
                if query_id not in texts:
                    raise RagkitError(f"{where}: query '{query_id}' is not in {self.queries.name} (add it or remove the line)")
                question = by_query.get(query_id)
                if question is None:
                    question = by_query[query_id] = _Question(query_id, texts[query_id], [], qrels.stem, where,
                                                              judged_windows_positive=True)
                if any(doc_id == judged for judged, _, _ in question.judged):
                    raise RagkitError(f"{where}: query '{query_id}' judges document '{doc_id}' twice (keep one line)")
                question.judged.append((doc_id, score, where))
            if not by_query:
                raise located(qrels, None, "empty input: no judgements (remove the file or fill it)")
            out.extend(by_query.values())
        return out

    def documents(self) -> Iterator[_Document]:
        if not self.corpus.is_file():
            raise located(self.path, None, "no corpus.jsonl (a BEIR directory needs one)")
        fix = "BEIR corpus lines are {_id, title, text}"
        for line, record in _jsonl_records(self.corpus):
            where = f"{self.corpus}:{line}"
            yield _Document(_required_id(record, "_id", where, fix), _optional_text(record, "title", where),
                            _required_text(record, "text", where, fix), self.corpus, line)


class _Squad(_Source):
    role = "passages+questions"
    holds_passages = True

    def _paragraphs(self) -> Iterator[tuple[str, str, str, list, str]]:
        """``(doc_id, title, context, qas, where)`` per paragraph. Ids are ``{title}-{k}``, k counting the
        paragraphs under that title: stable, and distinct across files of different articles (train, dev)."""
        data = _load_json(self.path)
        articles = data.get("data") if isinstance(data, dict) else None
        if not isinstance(articles, list):
            raise located(self.path, None, 'not SQuAD JSON: expected {"data": [articles]} (pass --format for another format)')
        per_title: collections.Counter[str] = collections.Counter()
        for a, article in enumerate(articles):
            if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
                raise located(self.path, None, f"data[{a}] has no 'paragraphs' list (SQuAD articles are {{title, paragraphs}})")
            title = _id_value(article.get("title")) or str(a)
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"{self.path}: data[{a}].paragraphs[{p}]"
                if not isinstance(paragraph, dict):
                    raise RagkitError(f"{where}: expected an object {{context, qas}}")
                context = _required_text(paragraph, "context", where, "SQuAD paragraphs are {context, qas}")
                qas = paragraph.get("qas") or []
                if not isinstance(qas, list) or not all(isinstance(qa, dict) for qa in qas):
                    raise RagkitError(f"{where}: 'qas' must be a list of objects")
                yield f"{title}-{per_title[title]}", title, context, qas, where
                per_title[title] += 1

    def questions(self) -> list[_Question]:
        split, out, empty = self.question_split(), [], True
        for doc_id, _, context, qas, where in self._paragraphs():
            empty = False
            for qa in qas:
                fix = "SQuAD questions are {id, question, answers}"
                question_id = _required_id(qa, "id", where, fix)
                at = f"{self.path}: question '{question_id}'"
                text = _required_text(qa, "question", at, fix)
                if qa.get("is_impossible"):
                    self.unanswerable += 1
                    continue
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                    raise RagkitError(f"{at}: 'answers' must be a list of {{text, answer_start}}")
                texts, spans = [], []
                for answer in answers:
                    answer_text = _required_text(answer, "text", at, "answers are {text, answer_start}")
                    start = answer.get("answer_start")
                    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                        raise RagkitError(f"{at}: answer {answer_text!r} has no integer answer_start")
                    if context[start:start + len(answer_text)] != answer_text:
                        there = context[start:start + len(answer_text)]
                        raise RagkitError(f"{at}: answer {answer_text!r} does not match its context at answer_start={start} "
                                          f"(the context there reads {there!r}); fix the offset or the text")
                    texts.append(answer_text)
                    # White space at the edges of a span is not part of the answer, and windows exclude it too.
                    lead = len(answer_text) - len(answer_text.lstrip())
                    if answer_text.strip():
                        spans.append((doc_id, start + lead, start + len(answer_text.rstrip())))
                out.append(_Question(question_id, text, _unique(texts), split, at, spans=spans, judged=[(doc_id, 1, at)]))
        if empty:
            raise located(self.path, None, "empty input: no paragraphs (pass a non-empty SQuAD file)")
        return out

    def documents(self) -> Iterator[_Document]:
        for doc_id, title, context, _, _ in self._paragraphs():
            yield _Document(doc_id, title, context, self.path, None)


class _Jsonl(_Source):
    def _records(self) -> Iterator[tuple[int, dict, bool]]:
        """``(line, record, is_question)``: a line with the question field is a question, else a passage."""
        f = self.fields
        for line, record in _jsonl_records(self.path):
            if f.question in record:
                yield line, record, True
            elif f.text in record:
                yield line, record, False
            else:
                raise located(self.path, line, f"neither '{f.text}' (passage) nor '{f.question}' (question) is a field "
                              "(set --text-field / --question-field to the fields holding them)")

    def questions(self) -> list[_Question]:
        f, split, out = self.fields, self.question_split(), []
        for line, record, is_question in self._records():
            if not is_question:
                self.holds_passages = True
                continue
            where = f"{self.path}:{line}"
            text = _required_text(record, f.question, where, "set --question-field to the field holding the question")
            answers = _unique(_string_list(record.get(f.answers), f.answers, where))
            gold = _unique(_string_list(record.get(f.positives), f.positives, where, ids=True))
            out.append(_Question(_id_value(record.get(f.id)), text, answers, split, where, gold=gold,
                                 judged=[(g, 1, where) for g in gold]))
        self.role = "+".join(role for role, held in (("passages", self.holds_passages), ("questions", out)) if held)
        return out

    def documents(self) -> Iterator[_Document]:
        f = self.fields
        for line, record, is_question in self._records():
            if is_question:
                continue
            where = f"{self.path}:{line}"
            yield _Document(_required_id(record, f.id, where, "set --id-field to the field holding the passage id"),
                            _optional_text(record, f.title, where),
                            _required_text(record, f.text, where, "set --text-field to the field holding the text"),
                            self.path, line)


_READERS: dict[str, type[_Source]] = {
    "dpr-passages": _DprPassages, "dpr-qas": _DprQas, "dpr-json": _DprJson,
    "beir": _Beir, "squad": _Squad, "jsonl": _Jsonl,
}


# --- formats ----------------------------------------------------------------------------------------


def _sniff_json(path: Path) -> str | None:
    with _open_bytes(path) as handle:
        head = handle.read(1 << 16).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if not head:
        raise located(path, None, "empty input: the file holds no JSON (pass a non-empty file)")
    if head.startswith("{"):
        if re.search(r'"data"\s*:\s*\[', head) and re.search(r'"paragraphs"\s*:', head):
            return "squad"
        return None
    if head.startswith("["):
        for _, item in _json_array_items(path):
            return "dpr-json" if isinstance(item, dict) and "positive_ctxs" in item else None
    return None


def _tsv_holds_passages(path: Path) -> bool:
    for _, text in _lines(path):
        names = [name.strip().lower() for name in text.rstrip("\r\n").split("\t")]
        return names[0] in ("id", "text", "title") and "id" in names and "text" in names
    raise located(path, None, "empty input: the file has no lines (pass a non-empty file)")


def detect_format(path: str | Path, format: str = "auto") -> str:
    """Which reader ``path`` needs: one of :data:`FORMATS`.

    ``format`` is ``--format``: ``auto`` decides from the path (a directory with ``corpus.jsonl`` is BEIR;
    ``.json`` is SQuAD when it holds ``{"data": [{"paragraphs": ...}]}``, a DPR retriever file when it is
    a list of objects with ``positive_ctxs``; ``.tsv``/``.csv`` is a DPR passage file when its header
    names id/text/title, else a DPR qas file; ``.jsonl`` is jsonl). A ``.gz`` suffix is looked through.
    """
    path = Path(path)
    if not path.exists():
        raise located(path, None, "no such file or directory (check the path)")
    if path.is_dir():
        if format in ("auto", "beir") and (path / "corpus.jsonl").is_file():
            return "beir"
        raise located(path, None, "a directory is read as BEIR data and needs corpus.jsonl (pass files for other formats)")
    if format == "beir":
        raise located(path, None, "--format beir reads a directory holding corpus.jsonl, queries.jsonl and qrels/ "
                      "(pass that directory)")
    suffixes = [x.lower() for x in path.suffixes]
    suffix = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else path.suffix.lower()
    if format == "jsonl" or (format == "auto" and suffix == ".jsonl"):
        return "jsonl"
    if suffix in (".tsv", ".csv") and format in ("auto", "dpr"):
        return "dpr-passages" if _tsv_holds_passages(path) else "dpr-qas"
    if suffix == ".json" and format in ("auto", "dpr", "squad"):
        if format == "squad":
            return "squad"
        if format == "dpr":
            return "dpr-json"
        sniffed = _sniff_json(path)
        if sniffed is None:
            raise located(path, None, 'cannot tell the JSON format: SQuAD is {"data": [{"paragraphs": ...}]}, a DPR retriever '
                          "file is a list of {question, answers, positive_ctxs} (fix the file or pass --format)")
        return sniffed
    given = "" if format == "auto" else f"--format {format} "
    raise located(path, None, f"{given}cannot read '{suffix or path.name}' files (ragkit reads DPR .tsv/.csv/.json, SQuAD .json, "
                  ".jsonl and BEIR directories; convert the file or pass the right --format)")


def _open_source(spec: str, format: str, fields: _Fields) -> _Source:
    split = None
    match = re.fullmatch(r"([^=/\\]+)=(.+)", spec)
    if match and not Path(spec).exists():
        split, spec = match.groups()
        if not _SPLIT_NAME.fullmatch(split):
            raise RagkitError(f"{spec}: split name {split!r} must be letters, digits, '_', '-' or '.' "
                              "(fix the split=path input)")
    path = Path(spec)
    kind = detect_format(path, format)
    if split is not None and kind == "dpr-passages":
        raise located(path, None, f"holds passages, so '{split}=' names no question split (drop the '{split}=' prefix)")
    return _READERS[kind](path, split, fields)


# --- writing passages -------------------------------------------------------------------------------


class _DigestSet:
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


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the progress bars ``datasets`` shows while saving a few rows."""
    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


class _PassageWriter:
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
        with _quiet_datasets():
            empty = datasets.Dataset.from_dict({name: [] for name in PASSAGE_COLUMNS}, features=self.features)
            empty.save_to_disk(str(template))
        state = json.loads((template / datasets.config.DATASET_STATE_JSON_FILENAME).read_text(encoding="utf-8"))
        state["_data_files"] = [{"filename": name} for name in names]
        (self.directory / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(
            json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = datasets.config.DATASET_INFO_FILENAME
        shutil.copyfile(template / info, self.directory / info)
        shutil.rmtree(template)


class _Windows(NamedTuple):
    """The windows of a document some question refers to."""

    ids: list[str]
    ranges: list[tuple[int, int]]
    texts: list[str] | None
    """Kept only for a cut gold passage, to find the windows that hold an answer."""


@dataclasses.dataclass
class _CorpusCounts:
    documents: int = 0
    passages: int = 0
    documents_windowed: int = 0
    max_windows_per_document: int = 0
    duplicates_dropped: int = 0


def _write_passages(documents: Iterable[_Document], directory: Path, wanted: dict[str, bool], window: int,
                    stride: int, dedup: bool) -> tuple[dict[str, _Windows], _CorpusCounts]:
    """Window and write every document; return the windows of the ``wanted`` ones and the counts.

    ``wanted`` maps a document id to whether its window texts are needed too. A document is a repeat when
    its id was seen, or when one of its passage ids equals an earlier passage id (a source id such as
    ``a#1`` against the second window of ``a``); only ids holding ``#`` can collide that second way.
    """
    seen, writer, counts = _DigestSet(), _PassageWriter(directory), _CorpusCounts()
    found: dict[str, _Windows] = {}
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
            digests = [_digest(key) for _, _, _, keys in windowed for key in keys]
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
                    found[doc.doc_id] = _Windows(ids, ranges, texts if keep_texts else None)
                counts.documents += 1
                counts.passages += len(ids)
                counts.documents_windowed += int(len(ids) > 1)
                counts.max_windows_per_document = max(counts.max_windows_per_document, len(ids))
            seen.add(np.array(list(fresh), dtype="S16"))
            writer.write(columns)
            progress.update(len(batch))
    if writer.rows == 0:
        raise RagkitError("no passages in the inputs (add a corpus: a DPR passage tsv, a BEIR directory, SQuAD or "
                          "jsonl passages)")
    writer.close()
    return found, counts


# --- questions -------------------------------------------------------------------------------------


def _wanted_documents(questions: Iterable[_Question]) -> dict[str, bool]:
    """Documents whose windows questions refer to -> whether their window texts are needed as well."""
    wanted: dict[str, bool] = {}
    for q in questions:
        for doc in q.documents() + q.hard_negatives:
            wanted.setdefault(doc, False)
        if q.answers:
            for doc in q.gold:
                wanted[doc] = True
    return wanted


def _resolve(q: _Question, found: dict[str, _Windows]) -> dict[str, Any]:
    """The question's row: its evidence mapped from source documents to passage ids."""

    def windows(doc_id: str, where: str) -> _Windows:
        if doc_id not in found:
            raise RagkitError(f"{where}: document '{doc_id}' is not in the corpus (pass the corpus that holds it, "
                              "or remove the reference)")
        return found[doc_id]

    positives: list[str] = []
    for doc_id, start, end in q.spans:
        w = windows(doc_id, q.where)
        positives += [pid for pid, (s, e) in zip(w.ids, w.ranges) if s <= start and end <= e]
    for doc_id in q.gold:
        w = windows(doc_id, q.where)
        holding = [pid for pid, text in zip(w.ids, w.texts) if has_answer(q.answers, text)] if w.texts else []
        positives += holding or w.ids
    for doc_id, grade, where in q.judged:
        w = windows(doc_id, where)
        if q.judged_windows_positive and grade > 0:
            positives += w.ids
    positives = _unique(positives)
    taken = set(positives)
    hard = _unique(pid for doc_id in q.hard_negatives for pid in windows(doc_id, q.where).ids if pid not in taken)
    return {
        "id": q.id,
        "question": q.question,
        "answers": q.answers,
        "positive_ids": positives,
        "hard_negative_ids": hard,
        "doc_ids": [d for d, _, _ in q.judged],
        "doc_scores": [g for _, g, _ in q.judged],
    }


def _by_split(questions: list[_Question]) -> dict[str, list[_Question]]:
    """Questions grouped by split (in input order), missing ids filled in as ``{split}-{n}``."""
    splits: dict[str, list[_Question]] = {}
    for q in questions:
        splits.setdefault(q.split, []).append(q)
    for split, members in splits.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise RagkitError(f"{members[0].where}: split name {split!r} must be letters, digits, '_', '-' or '.' "
                              "(rename it)")
        ids: set[str] = set()
        for n, q in enumerate(members):
            if q.id is None:
                q.id = f"{split}-{n}"
            if q.id in ids:
                raise RagkitError(f"{q.where}: duplicate question id '{q.id}' in split '{split}' "
                                  "(ids must be unique within a split)")
            ids.add(q.id)
    return splits


def _carve_dev(splits: dict[str, list[_Question]], fraction: float, seed: int, inputs: Sequence[str]) -> None:
    if "dev" in splits:
        raise RagkitError(f"{splits['dev'][0].where}: the inputs already hold a 'dev' split; drop --dev-fraction or "
                          "the dev questions")
    train = splits.get("train", [])
    flags = carve_dev([q.documents() for q in train], fraction, seed)
    dev = [q for q, flag in zip(train, flags) if flag]
    if not dev or len(dev) == len(train):
        raise RagkitError(f"--dev-fraction {fraction} leaves {'no' if not dev else 'every'} train question for dev "
                          f"({len(train)} train questions from {', '.join(inputs)}); adjust --dev-fraction")
    splits["train"] = [q for q, flag in zip(train, flags) if not flag]
    splits["dev"] = dev


def _save_questions(rows: list[dict[str, Any]], directory: Path) -> None:
    columns = {name: [row[name] for row in rows] for name in QUESTION_COLUMNS}
    with _quiet_datasets():
        datasets.Dataset.from_dict(columns, features=question_features()).save_to_disk(str(directory))


# --- the stage -------------------------------------------------------------------------------------


def run(cfg: IngestConfig) -> Manifest:
    """Read ``cfg.inputs`` and write the ingest artifact (passages + questions/<split>) to ``cfg.out``."""
    if not cfg.inputs:
        raise RagkitError("no inputs (pass corpus and question files, or a BEIR directory)")
    fields = _Fields(cfg.id_field, cfg.title_field, cfg.text_field, cfg.question_field, cfg.answers_field,
                     cfg.positives_field)
    sources = [_open_source(spec, cfg.format, fields) for spec in cfg.inputs]
    with staged_output(cfg.out, cfg.overwrite) as tmp:
        questions = [q for source in sources for q in source.questions()]
        splits = _by_split(questions)
        if cfg.dev_fraction:
            _carve_dev(splits, cfg.dev_fraction, cfg.seed, cfg.inputs)
        corpus = [s for s in sources if s.holds_passages] or [s for s in sources if isinstance(s, _DprJson)]
        documents = itertools.chain.from_iterable(source.documents() for source in corpus)
        found, counts = _write_passages(documents, tmp / "passages", _wanted_documents(questions), cfg.window,
                                        cfg.stride, cfg.dedup)
        files = {"passages": "passages"}
        without_positive = 0
        (tmp / "questions").mkdir()
        for split, members in splits.items():
            rows = [_resolve(q, found) for q in members]
            without_positive += sum(not row["positive_ids"] for row in rows)
            _save_questions(rows, tmp / "questions" / split)
            files[f"questions/{split}"] = f"questions/{split}"
        manifest = Manifest(
            stage="ingest",
            config=as_dict(cfg),
            inputs=[file_input(path, role) for source in sources for path, role in source.files()],
            counts={
                "documents": counts.documents,
                "passages": counts.passages,
                "questions": {split: len(members) for split, members in splits.items()},
                "questions_without_positive": without_positive,
                "documents_windowed": counts.documents_windowed,
                "max_windows_per_document": counts.max_windows_per_document,
                "duplicates_dropped": counts.duplicates_dropped,
                "unanswerable_skipped": sum(source.unanswerable for source in sources),
            },
            files=files,
        )
        manifest.save(tmp)
    manifest.path = Path(cfg.out)
    return manifest
