"""MS MARCO passage ranking (and TREC collections in its layout), streamed.

* ``collection.tsv``: ``pid<TAB>passage``, no header, no title (8.8M lines in MS MARCO; read line by line,
  so memory does not grow with it).
* ``queries.<split>.tsv``: ``qid<TAB>query``; the split comes from the name (``queries.dev.small.tsv``: dev) or
  ``split=path``.
* qrels (``qrels.<split>.tsv``, ``*.qrels``): :mod:`.qrels`.
* Given hard negatives, for ``ragkit mine --given-negatives``: ``qidpidtriples.train.full*.tsv``
  (``qid<TAB>pid+<TAB>pid-``) and ``top1000.<split>.tsv`` (``qid<TAB>pid<TAB>query<TAB>passage``). A question's
  negatives are the pids named with it, in file order; its positives are left out of them.
* A directory holding ``collection.tsv``: the collection, and each ``queries.X.tsv`` that has a ``qrels.X.tsv``
  beside it; as in BEIR, the questions of a split are the queries its qrels judge. Negatives files are read
  only when given as inputs (the official triples hold ~400M lines).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ..errors import RagkitError, located
from .files import read_lines
from .qrels import read_qrels
from .sources import Document, Question, ReadOptions, Source, unique
from .splits import infer_split


def _gz(path: Path) -> Path:
    """``path``, or ``path.gz`` when only that exists."""
    packed = path.with_name(path.name + ".gz")
    return packed if not path.is_file() and packed.is_file() else path


def _id_and_rest(path: Path, line: int, text: str, layout: str) -> tuple[str, str]:
    """The first tab-separated field and the rest of a line; an error when either is missing."""
    first, tab, rest = text.rstrip("\r\n").partition("\t")
    if not tab or not first:
        raise located(path, line, f"expected {layout}; fix the line")
    return first, rest


class MsMarcoCollection(Source):
    role = "passages"
    holds_passages = True

    def documents(self) -> Iterator[Document]:
        empty = True
        for line, text in read_lines(self.path):
            if text.strip():
                pid, passage = _id_and_rest(self.path, line, text, "pid<TAB>passage (MS MARCO collection.tsv)")
                empty = False
                yield Document(pid, "", passage, self.path, line)
        if empty:
            raise located(self.path, None, "empty input: no passages (pass a non-empty file)")


class MsMarcoQueries(Source):
    def read(self) -> Iterator[Question]:
        split, empty = self.question_split(), True
        for line, text in read_lines(self.path):
            if text.strip():
                qid, query = _id_and_rest(self.path, line, text, "qid<TAB>query (MS MARCO queries tsv)")
                if not query.strip():
                    raise located(self.path, line, "empty query (remove the line)")
                empty = False
                yield Question(qid, query, [], split, f"{self.path}:{line}")
        if empty:
            raise located(self.path, None, "empty input: no queries (pass a non-empty file)")

    def questions(self) -> list[Question]:
        return list(self.read())


class _GivenNegatives(Source):
    """Hard negatives named per question id; lines whose question is not among the inputs are counted."""

    role = "negatives"
    columns: int
    exact: bool
    """Exactly ``columns`` tab-separated fields; else at least that many (a passage may hold a tab)."""
    negative: int
    """The field holding the negative pid."""
    layout: str

    def pair(self, line: int, text: str) -> tuple[str, str]:
        """``(qid, negative pid)`` of a line."""
        fields = text.rstrip("\r\n").split("\t")
        if (len(fields) != self.columns if self.exact else len(fields) < self.columns) or not fields[0] \
                or not fields[self.negative]:
            raise located(self.path, line, f"{len(fields)} tab-separated fields, expected {self.layout}; fix the line")
        return fields[0], fields[self.negative]

    def attach(self, questions: dict[str, dict[str, Question]]) -> None:
        members = questions.get(self.question_split(), {})
        touched: dict[str, Question] = {}
        for line, text in read_lines(self.path):
            if not text.strip():
                continue
            qid, pid = self.pair(line, text)
            question = members.get(qid)
            if question is None:
                self.unmatched += 1
                continue
            question.hard_negatives.append(pid)
            touched[qid] = question
        for question in touched.values():
            question.hard_negatives = unique(question.hard_negatives)
        if not touched and not self.unmatched:
            raise located(self.path, None, "empty input: no lines (pass a non-empty file)")


class MsMarcoTriples(_GivenNegatives):
    columns, exact, negative = 3, True, 2
    layout = "qid<TAB>pid+<TAB>pid- (MS MARCO qidpidtriples)"


class MsMarcoTop1000(_GivenNegatives):
    columns, exact, negative = 4, False, 1
    layout = "qid<TAB>pid<TAB>query<TAB>passage (MS MARCO top1000)"


_QUERIES = re.compile(r"queries\.(.+)\.tsv(\.gz)?")


class MsMarcoDirectory(Source):
    role = "passages"
    holds_passages = True

    def __init__(self, path: Path, split: str | None, options: ReadOptions) -> None:
        super().__init__(path, split, options)
        self.collection = _gz(path / "collection.tsv")
        self.pairs: list[tuple[Path, Path]] = []
        """``(queries, qrels)`` of each split: ``queries.X.tsv`` with ``qrels.X.tsv``."""
        found: dict[str, Path] = {}
        for queries in sorted(path.iterdir()):
            match = _QUERIES.fullmatch(queries.name)
            qrels = _gz(path / f"qrels.{match.group(1)}.tsv") if match else None
            if qrels is None or not qrels.is_file():
                continue
            name = infer_split(queries)
            if split is not None and name != split:
                continue
            if name in found:
                raise located(path, None, f"{found[name].name} and {queries.name} both hold '{name}' queries with qrels "
                              f"(pass the files you want instead of the directory, e.g. {name}={queries.name})")
            found[name] = queries
            self.pairs.append((queries, qrels))
        if split is not None and not self.pairs:
            raise located(path, None, f"no queries.X.tsv with qrels.X.tsv for split '{split}' (fix the split name)")

    def files(self) -> list[tuple[Path, str]]:
        return [(self.collection, "passages")] + [(f, role) for queries, qrels in self.pairs
                                                  for f, role in ((queries, "queries"), (qrels, "qrels"))]

    def questions(self) -> list[Question]:
        out = []
        for queries, qrels in self.pairs:
            judgements: dict[str, list[tuple[str, str, int]]] = {}
            for where, qid, doc_id, grade in read_qrels(qrels):
                judgements.setdefault(qid, []).append((where, doc_id, grade))
            reader = MsMarcoQueries(queries, infer_split(queries), self.options)
            for question in reader.read():
                for where, doc_id, grade in judgements.pop(question.id, ()):
                    question.judge(doc_id, grade, where)
                if question.judged:
                    out.append(question)
            for qid, ((where, _, _), *_) in judgements.items():
                raise RagkitError(f"{where}: query '{qid}' is not in {queries.name} (add it or remove the line)")
        return out

    def documents(self) -> Iterator[Document]:
        return MsMarcoCollection(self.collection, None, self.options).documents()
