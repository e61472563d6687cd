"""jsonl with configurable field names: a line with the text field is a passage, a line with the question
field a question (its gold passages named by id).
"""

from __future__ import annotations

from typing import Iterator

from ..errors import located
from .files import jsonl_records
from .sources import (Document, Judgement, Question, Source, id_value, optional_text, required_id, required_text,
                      string_list, unique)


class Jsonl(Source):
    def _records(self) -> Iterator[tuple[int, dict, bool]]:
        """``(line, record, is_question)``: a line with the question field is a question, else a passage."""
        f = self.fields
        for line, record in jsonl_records(self.path):
            if f.question in record:
                yield line, record, True
            elif f.text in record:
                yield line, record, False
            else:
                raise located(self.path, line, f"neither '{f.text}' (passage) nor '{f.question}' (question) is a field "
                              "(set --text-field / --question-field to the fields holding them)")

    def questions(self) -> list[Question]:
        f, split, out = self.fields, self.question_split(), []
        for line, record, is_question in self._records():
            if not is_question:
                self.holds_passages = True
                continue
            where = f"{self.path}:{line}"
            text = required_text(record, f.question, where, "set --question-field to the field holding the question")
            answers = unique(string_list(record.get(f.answers), f.answers, where))
            gold = unique(string_list(record.get(f.positives), f.positives, where, ids=True))
            out.append(Question(id_value(record.get(f.id)), text, answers, split, where, gold=gold,
                                 judged=[Judgement(g, 1, where) for g in gold]))
        self.role = "+".join(role for role, held in (("passages", self.holds_passages), ("questions", out)) if held)
        return out

    def documents(self) -> Iterator[Document]:
        f = self.fields
        for line, record, is_question in self._records():
            if is_question:
                continue
            where = f"{self.path}:{line}"
            yield Document(required_id(record, f.id, where, "set --id-field to the field holding the passage id"),
                            optional_text(record, f.title, where),
                            required_text(record, f.text, where, "set --text-field to the field holding the text"),
                            self.path, line)
