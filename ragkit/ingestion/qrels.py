"""Relevance judgements (qrels) attached to questions read from other inputs.

Two layouts, told apart line by line: TREC ``qid 0 doc grade`` (whitespace-separated, as in MS MARCO's
``qrels.<split>.tsv`` and TREC ``*.qrels``) and BEIR ``query-id<TAB>corpus-id<TAB>score`` (a header line
allowed). A judged document with a grade > 0 makes every window of it a positive; all judgements become
the question's ``doc_ids`` / ``doc_scores``.

A qrels file judges the questions of one split: the one ``split=FILE`` names, else the one its name announces
(``qrels.dev.small.tsv``: dev), else train. ``--qrels`` attaches such a file to any question file (jsonl,
tsv); a qrels file among the inputs does the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import RagkitError, located
from .files import read_lines
from .sources import Question, Source

_LAYOUTS = "TREC 'qid 0 doc grade' or BEIR 'query-id<TAB>corpus-id<TAB>score'"


def read_qrels(path: Path) -> Iterator[tuple[str, str, str, int]]:
    """``(where, query id, document id, grade)`` per judgement; a file without any is an error."""
    empty = True
    for line, text in read_lines(path):
        if not text.strip():
            continue
        # Tab-separated lines split on tabs only (ids may hold spaces there, as BEIR's may); others on white space.
        fields = text.rstrip("\r\n").split("\t") if "\t" in text else text.split()
        if line == 1 and fields[0] == "query-id":
            continue
        if len(fields) == 4:
            query_id, _, doc_id, grade = fields
        elif len(fields) == 3:
            query_id, doc_id, grade = fields
        else:
            raise located(path, line, f"{len(fields)} fields, expected {_LAYOUTS}; fix the line")
        try:
            score = int(grade)
        except ValueError:
            raise located(path, line, f"grade {grade!r} is not an integer (qrels grades are integers); fix the line") from None
        if not query_id or not doc_id:
            raise located(path, line, f"an empty query or document id ({_LAYOUTS}); fix the line")
        empty = False
        yield f"{path}:{line}", query_id, doc_id, score
    if empty:
        raise located(path, None, "empty input: no judgements (remove the file or fill it)")


class Qrels(Source):
    """A qrels file judging the questions of one split read from other inputs."""

    role = "qrels"

    def attach(self, questions: dict[str, dict[str, Question]]) -> None:
        split = self.question_split()
        members = questions.get(split, {})
        for where, query_id, doc_id, grade in read_qrels(self.path):
            question = members.get(query_id)
            if question is None:
                raise RagkitError(f"{where}: query '{query_id}' is not among the {len(members)} '{split}' questions "
                                  f"(name the split it judges, e.g. dev={self.path.name}, or remove the line)")
            question.judge(doc_id, grade, where)
