"""Reading input files: gzip looked through, UTF-8 checked, lines, tsv records, jsonl, JSON and big JSON lists.

Every reader yields the line number with what it read, so that a bad record becomes one error naming
``file:line``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import RagkitError, located

_READ_CHUNK = 1 << 20
_MAX_JSON_ITEM_CHARS = 1 << 28
"""A retriever-JSON item still unparsed at this size is malformed, not merely unread."""

def _not_utf8(path: Path, line: int | None) -> RagkitError:
    return located(path, line, "not valid UTF-8 (re-encode the file as UTF-8, e.g. with iconv)")


@contextmanager
def open_bytes(path: Path) -> Iterator[Any]:
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


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file (line end included)."""
    with open_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, number) from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _first_bad_utf8_line(path: Path) -> int | None:
    with open_bytes(path) as handle:
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


def tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-blank tab-separated record, with DPR's quoting (``"``)."""
    lines = (text for _, text in read_lines(path))
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


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line, object)`` of each non-blank line; an empty file is an error."""
    empty = True
    for number, text in read_lines(path):
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


def load_json(path: Path) -> Any:
    with open_bytes(path) as handle:
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


def json_array_items(path: Path) -> Iterator[tuple[int, Any]]:
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

    with open_bytes(path) as handle:
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

