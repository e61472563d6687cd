"""DPR: the passage tsv (header ``id<TAB>text<TAB>title``, e.g. ``psgs_w100.tsv``), the retriever JSON (a list
of ``{question, answers, positive_ctxs, hard_negative_ctxs, negative_ctxs}``) and the ``qas`` tsv
(``question<TAB>['answer', ...]``, no header). A retriever JSON given without any other corpus brings its
own: the ctxs it names.
"""

from __future__ import annotations

import ast
from typing import Iterator

from ..errors import RagkitError, located
from .files import json_array_items, tsv_rows
from .sources import Document, Judgement, Question, Source, id_value, optional_text, required_text, string_list, unique

_CTX_ID_FIELDS = ("passage_id", "psg_id", "id")
_CTX_KINDS = ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs")


class DprPassages(Source):
    role = "passages"
    holds_passages = True

    def documents(self) -> Iterator[Document]:
        rows = tsv_rows(self.path)
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
            yield Document(row[at_id], title, row[at_text], self.path, line)
        if empty:
            raise located(self.path, None, "empty input: a header but no passages")


class DprQas(Source):
    def questions(self) -> list[Question]:
        split, out = self.question_split(), []
        for line, row in tsv_rows(self.path):
            fix = "DPR qas lines are question<TAB>['answer', ...]"
            if len(row) != 2:
                raise located(self.path, line, f"{len(row)} tab-separated fields, expected 2 ({fix})")
            try:
                answers = ast.literal_eval(row[1])
            except (ValueError, SyntaxError, TypeError, RecursionError):
                answers = None
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise located(self.path, line, f"the answers field is not a Python list of strings ({fix}; a "
                              "qid<TAB>query file needs --format msmarco)")
            if not row[0].strip():
                raise located(self.path, line, "empty question (remove the line)")
            out.append(Question(None, row[0], unique(answers), split, f"{self.path}:{line}"))
        if not out:
            raise located(self.path, None, "empty input: no questions (pass a non-empty file)")
        return out


class DprJson(Source):
    def _items(self) -> Iterator[tuple[int, dict]]:
        empty = True
        for line, item in json_array_items(self.path):
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
            value = id_value(ctx.get(name))
            if value:
                return value
        raise RagkitError(f"{where}: a '{kind}' entry has no passage_id (gold and negative ctxs need the id of their passage)")

    def questions(self) -> list[Question]:
        split, out = self.question_split(), []
        for line, item in self._items():
            where = f"{self.path}:{line}"
            text = required_text(item, "question", where, "each item needs the question text")
            answers = unique(string_list(item.get("answers"), "answers", where))
            gold = unique(self._ctx_id(c, "positive_ctxs", where) for c in self._ctxs(item, "positive_ctxs", where))
            hard = unique(self._ctx_id(c, "hard_negative_ctxs", where)
                           for c in self._ctxs(item, "hard_negative_ctxs", where))
            out.append(Question(id_value(item.get("id")), text, answers, split, where, gold=gold, hard_negatives=hard,
                                 judged=[Judgement(g, 1, where) for g in gold]))
        return out

    def documents(self) -> Iterator[Document]:
        for line, item in self._items():
            where = f"{self.path}:{line}"
            for kind in _CTX_KINDS:
                for ctx in self._ctxs(item, kind, where):
                    text = required_text(ctx, "text", where, f"every '{kind}' entry needs its passage text")
                    title = optional_text(ctx, "title", where)
                    yield Document(self._ctx_id(ctx, kind, where), title, text, self.path, line, repeatable=True)

