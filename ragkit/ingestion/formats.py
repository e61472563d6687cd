"""Which reader an input needs: ``--format`` and what the path and the file's first bytes say."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import RagkitError, located
from .beir import Beir
from .dpr import DprJson, DprPassages, DprQas
from .files import json_array_items, open_bytes, read_lines
from .jsonl import Jsonl
from .msmarco import MsMarcoCollection, MsMarcoDirectory, MsMarcoQueries, MsMarcoTop1000, MsMarcoTriples
from .qrels import Qrels
from .sources import ReadOptions, Source
from .splits import SPLIT_NAME
from .squad import Squad

FORMATS = ("dpr-passages", "dpr-qas", "dpr-json", "beir", "squad", "jsonl", "msmarco", "msmarco-collection",
           "msmarco-queries", "msmarco-triples", "msmarco-top1000", "qrels")
"""What :func:`detect_format` tells apart (``--format dpr`` covers the first three, ``--format msmarco`` the
rest but jsonl, squad and beir)."""

READERS: dict[str, type[Source]] = {
    "dpr-passages": DprPassages, "dpr-qas": DprQas, "dpr-json": DprJson,
    "beir": Beir, "squad": Squad, "jsonl": Jsonl,
    "msmarco": MsMarcoDirectory, "msmarco-collection": MsMarcoCollection, "msmarco-queries": MsMarcoQueries,
    "msmarco-triples": MsMarcoTriples, "msmarco-top1000": MsMarcoTop1000, "qrels": Qrels,
}
_PASSAGE_KINDS = ("dpr-passages", "msmarco-collection")


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


def _tsv_is_id_text(path: Path) -> bool:
    """The first line is a numeric id, a tab and text that is not a Python list (MS MARCO, not a DPR qas file)."""
    for _, text in read_lines(path):
        fields = text.rstrip("\r\n").split("\t")
        return len(fields) == 2 and fields[0].isdigit() and not fields[1].lstrip().startswith("[")
    return False


def _msmarco_by_name(path: Path) -> str | None:
    """The MS MARCO / TREC files a name gives away: triples, top1000, qrels (also any file in a ``qrels/`` folder)."""
    name = path.name.lower()
    if "qidpidtriples" in name:
        return "msmarco-triples"
    if "top1000" in name:
        return "msmarco-top1000"
    if "qrels" in name or path.parent.name == "qrels":
        return "qrels"
    return None


def _msmarco_tsv(path: Path, split: str | None) -> str:
    """An ``id<TAB>text`` file: a collection of passages or a file of queries."""
    name = path.name.lower()
    if "queries" in name:
        return "msmarco-queries"
    if "collection" in name:
        return "msmarco-collection"
    if split is not None:
        return "msmarco-queries"
    raise located(path, None, "an id<TAB>text file, but passages or queries? (name passages collection*.tsv, or give "
                  "queries a split: train=FILE)")


def detect_format(path: str | Path, format: str = "auto", split: str | None = None) -> str:
    """Which reader ``path`` needs: one of :data:`FORMATS`.

    ``format`` is ``--format``: ``auto`` decides from the path (a directory with ``corpus.jsonl`` is BEIR, one
    with ``collection.tsv`` MS MARCO; ``.json`` is SQuAD when it holds ``{"data": [{"paragraphs": ...}]}``, a
    DPR retriever file when it is a list of objects with ``positive_ctxs``; a name holding ``qrels``,
    ``qidpidtriples`` or ``top1000`` is that MS MARCO / TREC file; ``.tsv``/``.csv`` is a DPR passage file when
    its header names id/text/title, an MS MARCO collection or queries file when it is ``numeric id<TAB>text``
    (told apart by the name, or by a ``split`` given for it: queries), else a DPR qas file; ``.jsonl`` is
    jsonl). A ``.gz`` suffix is looked through.
    """
    path = Path(path)
    if not path.exists():
        raise located(path, None, "no such file or directory (check the path)")
    if path.is_dir():
        if format in ("auto", "beir") and (path / "corpus.jsonl").is_file():
            return "beir"
        if format in ("auto", "msmarco") and any((path / name).is_file() for name in ("collection.tsv", "collection.tsv.gz")):
            return "msmarco"
        raise located(path, None, "a directory is read as BEIR data (with corpus.jsonl) or MS MARCO data (with "
                      "collection.tsv) (pass files for other formats)")
    if format == "beir":
        raise located(path, None, "--format beir reads a directory holding corpus.jsonl, queries.jsonl and qrels/ "
                      "(pass that directory)")
    suffixes = [x.lower() for x in path.suffixes]
    suffix = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else path.suffix.lower()
    if format in ("auto", "msmarco") and suffix not in (".json", ".jsonl") and (kind := _msmarco_by_name(path)):
        return kind
    if format == "msmarco" and suffix == ".tsv":
        return _msmarco_tsv(path, split)
    if format == "jsonl" or (format == "auto" and suffix == ".jsonl"):
        return "jsonl"
    if suffix in (".tsv", ".csv") and format in ("auto", "dpr"):
        if _tsv_holds_passages(path):
            return "dpr-passages"
        if format == "auto" and suffix == ".tsv" and _tsv_is_id_text(path):
            return _msmarco_tsv(path, split)
        return "dpr-qas"
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
                  ".jsonl, MS MARCO .tsv, TREC qrels, BEIR and MS MARCO directories; convert the file or pass the right "
                  "--format)")


def _split_and_path(spec: str) -> tuple[str | None, Path]:
    """``split=path`` -> (split, path); a plain path (even one holding '=') -> (None, path)."""
    match = re.fullmatch(r"([^=/\\]+)=(.+)", spec)
    if not match or Path(spec).exists():
        return None, Path(spec)
    split, spec = match.groups()
    if not SPLIT_NAME.fullmatch(split):
        raise RagkitError(f"{spec}: split name {split!r} must be letters, digits, '_', '-' or '.' "
                          "(fix the split=path input)")
    return split, Path(spec)


def open_source(spec: str, format: str, options: ReadOptions) -> Source:
    split, path = _split_and_path(spec)
    kind = detect_format(path, format, split)
    if split is not None and kind in _PASSAGE_KINDS:
        raise located(path, None, f"holds passages, so '{split}=' names no question split (drop the '{split}=' prefix)")
    return READERS[kind](path, split, options)


def open_qrels(spec: str, options: ReadOptions) -> Qrels:
    """A ``--qrels [split=]FILE``: TREC or BEIR qrels judging the questions of that split."""
    split, path = _split_and_path(spec)
    if not path.is_file():
        raise located(path, None, "no such file (check the --qrels path)")
    return Qrels(path, split, options)

