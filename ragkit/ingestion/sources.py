"""What every reader produces: questions and documents as read, the :class:`Source` they come from, and the
checks of record fields that readers share.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from ..artifacts import file_input
from ..errors import RagkitError
from .splits import infer_split


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def id_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def required_id(record: dict, name: str, where: str, fix: str) -> str:
    value = id_value(record.get(name))
    if not value:
        raise RagkitError(f"{where}: missing field '{name}' ({fix})")
    return value


def required_text(record: dict, name: str, where: str, fix: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        problem = "missing field" if value is None else "not a string:"
        raise RagkitError(f"{where}: {problem} '{name}' ({fix})")
    return value


def optional_text(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RagkitError(f"{where}: field '{name}' is not a string (make it a string or drop it)")
    return value


def string_list(value: Any, name: str, where: str, ids: bool = False) -> list[str]:
    """A list of strings (ids may also be integers); one string stands for a list of one."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        items = [id_value(v) if ids else v for v in value]
        if all(isinstance(v, str) for v in items):
            return items
    raise RagkitError(f"{where}: field '{name}' must be a list of strings")


# --- questions and documents as read ----------------------------------------------------------------


class Judgement(NamedTuple):
    """A document judged for a question (qrels semantics: a grade > 0 is relevant)."""

    doc_id: str
    grade: int
    where: str
    """``file:line`` of the judgement, for messages."""
    evidence: bool = False
    """Every window of the document is a positive when the grade is > 0 (qrels, where the judgement is the
    evidence); False where other evidence picks the windows (an answer span, a named gold passage)."""


@dataclasses.dataclass(slots=True)
class Question:
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
    judged: list[Judgement] = dataclasses.field(default_factory=list)

    def documents(self) -> list[str]:
        return unique([j.doc_id for j in self.judged] + [d for d, _, _ in self.spans] + self.gold)

    def judge(self, doc_id: str, grade: int, where: str) -> None:
        """Add a qrels judgement. One that a named gold passage made takes the qrels grade; a repeat is an error."""
        for i, earlier in enumerate(self.judged):
            if earlier.doc_id == doc_id:
                if earlier.evidence:
                    raise RagkitError(f"{where}: query '{self.id}' judges document '{doc_id}' twice (keep one line)")
                self.judged[i] = Judgement(doc_id, grade, where, evidence=True)
                return
        self.judged.append(Judgement(doc_id, grade, where, evidence=True))


class Document(NamedTuple):
    doc_id: str
    title: str
    text: str
    path: Path
    line: int | None
    repeatable: bool = False
    """Expected to recur (a DPR ctx shared by questions): repeats are skipped, not errors."""


@dataclasses.dataclass
class Fields:
    """jsonl field names."""

    id: str
    title: str
    text: str
    question: str
    answers: str
    positives: str


@dataclasses.dataclass
class ReadOptions:
    """What readers take from the config."""

    fields: Fields
    strict: bool = False
    """Refuse a SQuAD answer that is not exactly at its ``answer_start`` instead of relocating it."""


class Source:
    """One input: the files it covers, the questions it holds, the documents it holds."""

    role = "questions"
    holds_passages = False

    def __init__(self, path: Path, split: str | None, options: ReadOptions) -> None:
        self.path, self.split, self.options, self.fields = path, split, options, options.fields
        self.unanswerable = 0
        self.relocated = 0
        """Answers found near, not at, their annotated offset (SQuAD)."""
        self.unmatched = 0
        """Lines naming a question that is not among the inputs (given negatives)."""

    def files(self) -> list[tuple[Path, str]]:
        return [(self.path, self.role)]

    def manifest_inputs(self) -> list[dict[str, Any]]:
        """What the manifest's ``inputs`` records of this input."""
        return [file_input(path, role) for path, role in self.files()]

    def question_split(self) -> str:
        return self.split or infer_split(self.path)

    def questions(self) -> list[Question]:
        return []

    def documents(self) -> Iterator[Document]:
        return iter(())

    def attach(self, questions: dict[str, dict[str, Question]]) -> None:
        """Add what this input says about questions read from other inputs (``questions[split][id]``): qrels,
        given negatives."""

