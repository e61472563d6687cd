"""TREC run files: ``qid Q0 passage_id rank score tag``, one line per retrieved passage.

The format is the one ``trec_eval``, pyserini and BEIR read and write. Within a question, results are
ordered by score (descending) and then by the rank column, as ``trec_eval`` orders them by score.
:func:`iter_trec` streams a run question by question, so a run over a million questions is never held
in memory; it requires each question's lines to be contiguous (true of every run ragkit writes and of
the usual tools' output).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from .errors import RagkitError, located

_SPACE = re.compile(r"\s")


class Ranking(NamedTuple):
    """One question's results, best first."""

    question_id: str
    passage_ids: list[str]
    scores: list[float]


@dataclasses.dataclass
class Run:
    """Question id -> :class:`Ranking`, in file order."""

    rankings: dict[str, Ranking] = dataclasses.field(default_factory=dict)
    tag: str = "ragkit"

    def __len__(self) -> int:
        return len(self.rankings)

    def __getitem__(self, question_id: str) -> Ranking:
        return self.rankings[question_id]

    def __iter__(self) -> Iterator[Ranking]:
        return iter(self.rankings.values())

    def add(self, question_id: str, passage_ids: Sequence[str], scores: Sequence[float]) -> None:
        self.rankings[question_id] = Ranking(question_id, list(passage_ids), [float(s) for s in scores])


def _check_token(value: str, what: str) -> str:
    if not value or _SPACE.search(value):
        raise RagkitError(f"TREC run: {what} {value!r} is empty or contains white space, which the format cannot hold")
    return value


def format_trec(question_id: str, passage_ids: Sequence[str], scores: Sequence[float], tag: str = "ragkit") -> str:
    """The TREC lines of one question's ranking (ranks from 1, in the order given)."""
    _check_token(question_id, "question id")
    if _SPACE.search("".join(passage_ids)) or not all(passage_ids):
        _check_token(next(p for p in passage_ids if not p or _SPACE.search(p)), "passage id")
    tail = f" {tag}\n"
    return "".join(
        f"{question_id} Q0 {pid} {rank} {float(score):.6f}{tail}"
        for rank, (pid, score) in enumerate(zip(passage_ids, scores), start=1)
    )


class TrecWriter:
    """Append rankings to a TREC run file as they are produced."""

    def __init__(self, path: str | Path, tag: str = "ragkit") -> None:
        self.path = Path(path)
        self.tag = _check_token(tag, "tag")
        self._handle = open(self.path, "w", encoding="utf-8")

    def write(self, question_id: str, passage_ids: Sequence[str], scores: Sequence[float]) -> None:
        self._handle.write(format_trec(question_id, passage_ids, scores, self.tag))

    def write_text(self, lines: str) -> None:
        """Append lines already made by :func:`format_trec` (e.g. in another process)."""
        self._handle.write(lines)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "TrecWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_trec(path: str | Path, run: Run | Iterable[Ranking], tag: str | None = None) -> None:
    """Write a whole run (use :class:`TrecWriter` to stream one)."""
    tag = tag or (run.tag if isinstance(run, Run) else "ragkit")
    with TrecWriter(path, tag) as writer:
        for ranking in run:
            writer.write(ranking.question_id, ranking.passage_ids, ranking.scores)


def _parse_line(path: Path, line_no: int, line: str) -> tuple[str, str, int, float, str]:
    fields = line.split()
    if len(fields) != 6:
        raise located(path, line_no, f"expected 6 fields 'qid Q0 passage_id rank score tag', got {len(fields)} (fix or regenerate the run)")
    qid, _, pid, rank, score, tag = fields
    try:
        rank_value = int(rank)
        score_value = float(score)
    except ValueError:
        raise located(path, line_no, f"rank {rank!r} must be an integer and score {score!r} a number (fix or regenerate the run)") from None
    if math.isnan(score_value):
        raise located(path, line_no, "score is NaN (regenerate the run)")
    return qid, pid, rank_value, score_value, tag


def _finish(path: Path, qid: str, entries: list[tuple[float, int, str, int]]) -> Ranking:
    entries.sort(key=lambda e: (-e[0], e[1]))
    seen: dict[str, int] = {}
    for _, _, pid, line_no in entries:
        if pid in seen:
            raise located(path, line_no, f"passage {pid!r} is listed twice for question {qid!r} (line {seen[pid]} too); remove the duplicate")
        seen[pid] = line_no
    return Ranking(qid, [e[2] for e in entries], [e[0] for e in entries])


def iter_trec(path: str | Path) -> Iterator[Ranking]:
    """Stream a TREC run one question at a time (each question's lines must be contiguous)."""
    path = Path(path)
    if not path.is_file():
        raise RagkitError(f"{path}: no such run file (run the stage that writes runs first)")
    finished: set[str] = set()
    current: str | None = None
    entries: list[tuple[float, int, str, int]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            qid, pid, rank, score, _ = _parse_line(path, line_no, line)
            if qid != current:
                if current is not None:
                    yield _finish(path, current, entries)
                    finished.add(current)
                if qid in finished:
                    raise located(path, line_no, f"question {qid!r} appears again after other questions (group the run by question, e.g. `sort -s -k1,1`)")
                current, entries = qid, []
            entries.append((score, rank, pid, line_no))
    if current is not None:
        yield _finish(path, current, entries)


def read_trec(path: str | Path) -> Run:
    """Read a whole TREC run; its tag is taken from the first line."""
    run = Run()
    for ranking in iter_trec(path):
        run.rankings[ranking.question_id] = ranking
    if run.rankings:
        with open(path, encoding="utf-8") as handle:
            run.tag = next(line for line in handle if line.strip()).split()[5]
    return run
