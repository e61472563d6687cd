"""The ``ragkit ingest`` stage: read every input, resolve questions' evidence to passage ids, write the artifact."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable

from ..answers import has_answer
from ..artifacts import Manifest, staged_output
from ..config import IngestConfig, as_dict
from ..errors import RagkitError
from .dpr import DprJson
from .formats import open_qrels, open_source
from .frames import Frames
from .sources import Fields, Question, ReadOptions, unique
from .splits import by_split, carve_dev_split
from .windows import Windows
from .writers import save_questions, write_passages


def _wanted_documents(questions: Iterable[Question]) -> dict[str, bool]:
    """Documents whose windows questions refer to -> whether their window texts are needed as well."""
    wanted: dict[str, bool] = {}
    for q in questions:
        for doc in q.documents() + q.hard_negatives:
            wanted.setdefault(doc, False)
        if q.answers:
            for doc in q.gold:
                wanted[doc] = True
    return wanted


def _resolve(q: Question, found: dict[str, Windows]) -> dict[str, Any]:
    """The question's row: its evidence mapped from source documents to passage ids."""

    def windows(doc_id: str, where: str) -> Windows:
        if doc_id not in found:
            raise RagkitError(f"{where}: document '{doc_id}' is not in the corpus (pass the corpus that holds it, "
                              "or remove the reference)")
        return found[doc_id]

    positives: list[str] = []
    for doc_id, start, end in q.spans:
        w = windows(doc_id, q.where)
        positives += [pid for pid, (s, e) in zip(w.ids, w.ranges) if s <= start and end <= e]
    for doc_id in q.gold:
        w = windows(doc_id, q.where)
        holding = [pid for pid, text in zip(w.ids, w.texts) if has_answer(q.answers, text)] if w.texts else []
        positives += holding or w.ids
    for judged in q.judged:
        w = windows(judged.doc_id, judged.where)
        if judged.evidence and judged.grade > 0:
            positives += w.ids
    positives = unique(positives)
    taken = set(positives)
    hard = unique(pid for doc_id in q.hard_negatives for pid in windows(doc_id, q.where).ids if pid not in taken)
    return {
        "id": q.id,
        "question": q.question,
        "answers": q.answers,
        "positive_ids": positives,
        "hard_negative_ids": hard,
        "doc_ids": [j.doc_id for j in q.judged],
        "doc_scores": [j.grade for j in q.judged],
    }


def run(cfg: IngestConfig, frames: dict[str, Any] | None = None) -> Manifest:
    """Read ``cfg.inputs`` (and the in-memory records ``frames``, by split: see :mod:`.frames`) and write the
    ingest artifact (passages + questions/<split>) to ``cfg.out``."""
    if not cfg.inputs and not frames:
        raise RagkitError("no inputs (pass corpus and question files, a BEIR or MS MARCO directory, or records)")
    options = ReadOptions(Fields(cfg.id_field, cfg.title_field, cfg.text_field, cfg.question_field, cfg.answers_field,
                                 cfg.positives_field), cfg.strict)
    sources = [open_source(spec, cfg.format, options) for spec in cfg.inputs]
    sources += [open_qrels(spec, options) for spec in cfg.qrels]
    if frames:
        sources.append(Frames(frames, options))
    with staged_output(cfg.out, cfg.overwrite) as tmp:
        questions = [q for source in sources for q in source.questions()]
        splits = by_split(questions)
        by_id = {split: {q.id: q for q in members} for split, members in splits.items()}
        for source in sources:
            source.attach(by_id)
        named_inputs = cfg.inputs + (["in-memory records"] if frames else [])
        if cfg.dev_fraction:
            carve_dev_split(splits, cfg.dev_fraction, cfg.seed, named_inputs)
        if cfg.validation_fraction:
            # Carved after dev, from what is left of train, so adding it leaves the dev split unchanged.
            carve_dev_split(splits, cfg.validation_fraction, cfg.seed, named_inputs, "validation", "--validation-fraction")
        corpus = [s for s in sources if s.holds_passages] or [s for s in sources if isinstance(s, DprJson)]
        documents = itertools.chain.from_iterable(source.documents() for source in corpus)
        found, counts = write_passages(documents, tmp / "passages", _wanted_documents(questions), cfg.window,
                                        cfg.stride, cfg.dedup)
        files = {"passages": "passages"}
        without_positive = 0
        (tmp / "questions").mkdir()
        for split, members in splits.items():
            rows = [_resolve(q, found) for q in members]
            without_positive += sum(not row["positive_ids"] for row in rows)
            save_questions(rows, tmp / "questions" / split)
            files[f"questions/{split}"] = f"questions/{split}"
        manifest = Manifest(
            stage="ingest",
            config=as_dict(cfg),
            inputs=[item for source in sources for item in source.manifest_inputs()],
            counts={
                "documents": counts.documents,
                "passages": counts.passages,
                "questions": {split: len(members) for split, members in splits.items()},
                "questions_without_positive": without_positive,
                "documents_windowed": counts.documents_windowed,
                "max_windows_per_document": counts.max_windows_per_document,
                "duplicates_dropped": counts.duplicates_dropped,
                "unanswerable_skipped": sum(source.unanswerable for source in sources),
                "answers_relocated": sum(source.relocated for source in sources),
                "negatives_without_question": sum(source.unmatched for source in sources),
            },
            files=files,
        )
        manifest.save(tmp)
    manifest.path = Path(cfg.out)
    return manifest
