"""SQuAD v1.1 / v2.0 JSON: every paragraph is a document, every answerable question a question whose
positives are the windows holding its answer span.
"""

from __future__ import annotations

import collections
from typing import Iterator

from ..errors import RagkitError, located
from .files import load_json
from .sources import Document, Question, Source, id_value, required_id, required_text, unique


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
                    if context[start:start + len(answer_text)] != answer_text:
                        there = context[start:start + len(answer_text)]
                        raise RagkitError(f"{at}: answer {answer_text!r} does not match its context at answer_start={start} "
                                          f"(the context there reads {there!r}); fix the offset or the text")
                    texts.append(answer_text)
                    # White space at the edges of a span is not part of the answer, and windows exclude it too.
                    lead = len(answer_text) - len(answer_text.lstrip())
                    if answer_text.strip():
                        spans.append((doc_id, start + lead, start + len(answer_text.rstrip())))
                out.append(Question(question_id, text, unique(texts), split, at, spans=spans, judged=[(doc_id, 1, at)]))
        if empty:
            raise located(self.path, None, "empty input: no paragraphs (pass a non-empty SQuAD file)")
        return out

    def documents(self) -> Iterator[Document]:
        for doc_id, title, context, _, _ in self._paragraphs():
            yield Document(doc_id, title, context, self.path, None)

