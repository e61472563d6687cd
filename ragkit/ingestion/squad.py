"""SQuAD v1.1 / v2.0 JSON: every paragraph is a document, every answerable question a question whose
positives are the windows holding its answer span.

Annotated offsets are sometimes off by a few characters (a space at the edge of the text or of the offset,
a context edited after annotation). An answer not at its ``answer_start`` is relocated, when its text lies
close by, to the occurrence nearest the offset (see :func:`relocate_answer`); each relocation is counted
(``answers_relocated``) and the first few are logged. ``strict`` refuses the first one instead.
"""

from __future__ import annotations

import collections
import logging
from typing import Iterator

from ..errors import RagkitError, located
from .files import load_json
from .sources import Document, Judgement, Question, Source, id_value, required_id, required_text, unique

SLACK = 32
"""How many characters either side of its offset an answer's text is looked for."""
_LOGGED = 5
"""Relocations logged per file; the rest are only counted."""

logger = logging.getLogger(__name__)


def relocate_answer(context: str, text: str, start: int) -> tuple[int, int] | None:
    """Where an answer annotated at ``start`` but not found there lies: ``(start, end)`` in ``context`` of its
    text without the white space at its edges, or None when it is nowhere near.

    First the text at the offset is compared with both sides stripped of white space (a space annotated at
    the edge of the text, or an offset one character off onto a space); then the text (without its edge
    white space) is looked for within :data:`SLACK` characters of where it should start, and the nearest
    occurrence is taken (the earlier one of two as near).
    """
    core = text.strip()
    if not core:
        return None
    there = context[start:start + len(text)]
    if there.strip() == core:
        at = start + len(there) - len(there.lstrip())
        return at, at + len(core)
    expected = start + len(text) - len(text.lstrip())
    stop = expected + SLACK + len(core)  # occurrences starting at most SLACK characters after the offset
    best = None
    at = context.find(core, max(0, expected - SLACK), stop)
    while at != -1:
        if best is None or abs(at - expected) < abs(best - expected):
            best = at
        at = context.find(core, at + 1, stop)
    return None if best is None else (best, best + len(core))


class Squad(Source):
    role = "passages+questions"
    holds_passages = True

    def _paragraphs(self) -> Iterator[tuple[str, str, str, list, str]]:
        """``(doc_id, title, context, qas, where)`` per paragraph. Ids are ``{title}-{k}``, k counting the
        paragraphs under that title: stable, and distinct across files of different articles (train, dev)."""
        data = load_json(self.path)
        articles = data.get("data") if isinstance(data, dict) else None
        if not isinstance(articles, list):
            raise located(self.path, None, 'not SQuAD JSON: expected {"data": [articles]} (pass --format for another format)')
        per_title: collections.Counter[str] = collections.Counter()
        for a, article in enumerate(articles):
            if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
                raise located(self.path, None, f"data[{a}] has no 'paragraphs' list (SQuAD articles are {{title, paragraphs}})")
            title = id_value(article.get("title")) or str(a)
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"{self.path}: data[{a}].paragraphs[{p}]"
                if not isinstance(paragraph, dict):
                    raise RagkitError(f"{where}: expected an object {{context, qas}}")
                context = required_text(paragraph, "context", where, "SQuAD paragraphs are {context, qas}")
                qas = paragraph.get("qas") or []
                if not isinstance(qas, list) or not all(isinstance(qa, dict) for qa in qas):
                    raise RagkitError(f"{where}: 'qas' must be a list of objects")
                yield f"{title}-{per_title[title]}", title, context, qas, where
                per_title[title] += 1

    def questions(self) -> list[Question]:
        split, out, empty = self.question_split(), [], True
        for doc_id, _, context, qas, where in self._paragraphs():
            empty = False
            for qa in qas:
                fix = "SQuAD questions are {id, question, answers}"
                question_id = required_id(qa, "id", where, fix)
                at = f"{self.path}: question '{question_id}'"
                text = required_text(qa, "question", at, fix)
                if qa.get("is_impossible"):
                    self.unanswerable += 1
                    continue
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                    raise RagkitError(f"{at}: 'answers' must be a list of {{text, answer_start}}")
                texts, spans = [], []
                for answer in answers:
                    answer_text = required_text(answer, "text", at, "answers are {text, answer_start}")
                    start = answer.get("answer_start")
                    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                        raise RagkitError(f"{at}: answer {answer_text!r} has no integer answer_start")
                    texts.append(answer_text)
                    if context[start:start + len(answer_text)] == answer_text:
                        # White space at the edges of a span is not part of the answer, and windows exclude it too.
                        lead = len(answer_text) - len(answer_text.lstrip())
                        if answer_text.strip():
                            spans.append((doc_id, start + lead, start + len(answer_text.rstrip())))
                    else:
                        spans.append((doc_id, *self._relocate(context, answer_text, start, at)))
                out.append(Question(question_id, text, unique(texts), split, at, spans=spans, judged=[Judgement(doc_id, 1, at)]))
        if empty:
            raise located(self.path, None, "empty input: no paragraphs (pass a non-empty SQuAD file)")
        if self.relocated > _LOGGED:
            logger.warning("%s: %d answers relocated in all (the first %d shown)", self.path, self.relocated, _LOGGED)
        return out

    def _relocate(self, context: str, text: str, start: int, at: str) -> tuple[int, int]:
        """The span of an answer not at its offset; an error when ``strict`` or when it is nowhere near."""
        there = context[start:start + len(text)]
        span = None if self.options.strict else relocate_answer(context, text, start)
        if span is None:
            near = "" if self.options.strict else f" and does not occur within {SLACK} characters of it"
            raise RagkitError(f"{at}: answer {text!r} does not match its context at answer_start={start} (the context "
                              f"there reads {there!r}){near}; fix the offset or the text")
        self.relocated += 1
        if self.relocated <= _LOGGED:
            moved = span[0] - (start + len(text) - len(text.lstrip()))
            logger.warning("%s: answer %r is not at answer_start=%d (which reads %r); relocated to characters %d..%d "
                           "(%+d)", at, text, start, there, span[0], span[1], moved)
        return span

    def documents(self) -> Iterator[Document]:
        for doc_id, title, context, _, _ in self._paragraphs():
            yield Document(doc_id, title, context, self.path, None)

