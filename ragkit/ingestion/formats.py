"""Which reader an input needs: ``--format`` and what the path and the file's first bytes say."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import RagkitError, located
from .beir import Beir
from .dpr import DprJson, DprPassages, DprQas
from .files import json_array_items, open_bytes, read_lines
from .jsonl import Jsonl
from .sources import ReadOptions, Source
from .splits import SPLIT_NAME
from .squad import Squad

FORMATS = ("dpr-passages", "dpr-qas", "dpr-json", "beir", "squad", "jsonl")
"""What :func:`detect_format` tells apart (``--format dpr`` covers the first three)."""

READERS: dict[str, type[Source]] = {
    "dpr-passages": DprPassages, "dpr-qas": DprQas, "dpr-json": DprJson,
    "beir": Beir, "squad": Squad, "jsonl": Jsonl,
}


def _sniff_json(path: Path) -> str | None:
    with open_bytes(path) as handle:
        head = handle.read(1 << 16).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if not head:
        raise located(path, None, "empty input: the file holds no JSON (pass a non-empty file)")
    if head.startswith("{"):
        if re.search(r'"data"\s*:\s*\[', head) and re.search(r'"paragraphs"\s*:', head):
            return "squad"
        return None
    if head.startswith("["):
        for _, item in json_array_items(path):
            return "dpr-json" if isinstance(item, dict) and "positive_ctxs" in item else None
    return None


def _tsv_holds_passages(path: Path) -> bool:
    for _, text in read_lines(path):
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


def open_source(spec: str, format: str, options: ReadOptions) -> Source:
    split = None
    match = re.fullmatch(r"([^=/\\]+)=(.+)", spec)
    if match and not Path(spec).exists():
        split, spec = match.groups()
        if not SPLIT_NAME.fullmatch(split):
            raise RagkitError(f"{spec}: split name {split!r} must be letters, digits, '_', '-' or '.' "
                              "(fix the split=path input)")
    path = Path(spec)
    kind = detect_format(path, format)
    if split is not None and kind == "dpr-passages":
        raise located(path, None, f"holds passages, so '{split}=' names no question split (drop the '{split}=' prefix)")
    return READERS[kind](path, split, options)

