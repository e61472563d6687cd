"""``ragkit answer``: questions in, answers out, with the passages they were read from.

* One question (``ragkit answer READER --index INDEX "who ...?"``): the answer and its passages with
  their retrieval scores and prior ``p(z|x)``, printed.
* A question split of the index's ingest artifact (``--split dev``) or a jsonl file (``--questions``,
  one ``{"question", "id"?, "answers"?}`` per line): ``predictions.jsonl`` (one record per question:
  prediction, EM / F1 when answers are known, whether an answer string is in the passages read, the
  passages) and ``metrics.json`` in an ``answer`` artifact: EM and F1 (SQuAD normalisation, in %) and
  ``recall@n_docs``, the share of questions with an answer among their passages.

``READER`` is a ``train reader`` artifact or a generator directory / alias (``smollm2``), which then
retrieves with the index's own query tower. ``--n-docs 0`` answers closed-book: the same generator reads
the question alone, the baseline retrieval has to beat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..answers import exact_match, f1, has_answer
from ..artifacts import Manifest, artifact_input, file_input, read_upstream, staged_output, write_json_atomic
from ..config import as_dict
from ..errors import RagkitError, located
from ..evaluation import find_ingest, load_questions
from ..indexing.retrieval import PassageRetriever
from .config import AnswerConfig
from .decode import DecodingOptions
from .rag import Prediction, RagReader, is_reader

STAGE = "answer"
PREDICTIONS_FILE = "predictions.jsonl"


def sample_rows(count: int, limit: int, seed: int) -> list[int]:
    """A seeded, sorted sample of ``limit`` of ``count`` rows (all of them when ``limit`` is 0 or larger)."""
    if not limit or limit >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=limit, replace=False).tolist())


def answer_questions(reader: RagReader, retriever: PassageRetriever | None, questions: Any, n_docs: int,
                     decoding: str | None = None, batch_size: int = 8, options: DecodingOptions | None = None,
                     progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Answer the rows of a questions dataset (``id``, ``question``, ``answers``): per-question records, and
    EM / F1 / recall@n_docs in percent over the questions with answers."""
    records = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        predictions = reader.answer(chunk["question"], retriever if n_docs else None, n_docs, decoding, options)
        for question_id, golds, prediction in zip(chunk["id"], chunk["answers"], predictions):
            records.append(_record(question_id, list(golds or []), prediction, n_docs))
        if progress is not None:
            progress.update(len(chunk["id"]))
    return records, summarize(records, n_docs)


def _record(question_id: str, golds: list[str], prediction: Prediction, n_docs: int) -> dict[str, Any]:
    found = any(has_answer(golds, p["text"]) for p in prediction.passages) if golds and n_docs else None
    return {
        "id": question_id, "question": prediction.question, "answers": golds, "prediction": prediction.answer,
        "em": exact_match(prediction.answer, golds) if golds else None,
        "f1": f1(prediction.answer, golds) if golds else None,
        "answer_in_passages": None if found is None else float(found),
        "log_prob": prediction.log_prob, "passages": prediction.passages,
    }


def summarize(records: list[dict[str, Any]], n_docs: int) -> dict[str, float]:
    """EM, F1 and recall@n_docs in percent over the records with known answers."""
    judged = [r for r in records if r["em"] is not None]
    out: dict[str, float] = {"questions": len(records), "judged": len(judged)}
    if judged:
        out["em"] = round(100 * float(np.mean([r["em"] for r in judged])), 2)
        out["f1"] = round(100 * float(np.mean([r["f1"] for r in judged])), 2)
        if n_docs:
            out[f"recall@{n_docs}"] = round(100 * float(np.mean([r["answer_in_passages"] for r in judged])), 2)
    return out


def read_questions_file(path: str | Path) -> Any:
    """A jsonl file of ``{"question", "id"?, "answers"?}`` -> a questions dataset."""
    import datasets

    from ..ingestion.files import jsonl_records

    rows = []
    for number, record in jsonl_records(Path(path)):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise located(path, number, 'no "question" string (each line needs {"question": "...", "answers": [...]})')
        answers = record.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise located(path, number, '"answers" must be a list of strings')
        rows.append({"id": str(record.get("id", number)), "question": question.strip(), "answers": answers})
    return datasets.Dataset.from_list(rows)


def open_reader(cfg: AnswerConfig) -> tuple[RagReader, PassageRetriever | None]:
    """The reader and, unless closed-book, its retriever over the index."""
    if cfg.index is not None:
        read_upstream(cfg.index, "index")
    reader = RagReader.load(cfg.reader, index=cfg.index, version=cfg.version, device=cfg.device, precision=cfg.precision,
                            max_input_length=cfg.max_input_length)
    if cfg.n_docs == 0:
        return reader, None
    retriever = reader.retriever(cfg.index, cfg.version, mode=cfg.retrieval, mine=cfg.bm25, alpha=cfg.alpha, precision=cfg.precision)
    if cfg.n_docs > len(retriever):
        raise RagkitError(f"{cfg.index}: --n-docs {cfg.n_docs} is more than the {len(retriever)} passages of version {retriever.version.name}")
    return reader, retriever


def decoding_options(cfg: AnswerConfig) -> DecodingOptions:
    return DecodingOptions(max_new_tokens=cfg.max_new_tokens, num_beams=max(cfg.num_beams, 4) if cfg.decoding == "beam" and cfg.num_beams < 2 else cfg.num_beams)


def answer_one(cfg: AnswerConfig) -> Prediction:
    """The answer to ``cfg.question``."""
    reader, retriever = open_reader(cfg)
    return reader.answer([cfg.question], retriever, cfg.n_docs, cfg.decoding, decoding_options(cfg))[0]


def run(cfg: AnswerConfig) -> Manifest:
    """Answer a split or a questions file into the ``answer`` artifact ``cfg.out``."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise RagkitError(f"{out}: already exists (pass --overwrite to replace it)")
    if cfg.split:
        questions = load_questions(find_ingest(read_upstream(cfg.index, "index")), cfg.split)
        source = cfg.split
    else:
        questions = read_questions_file(cfg.questions)
        source = str(cfg.questions)
    questions = questions.select(sample_rows(len(questions), cfg.max_questions, cfg.seed))
    reader, retriever = open_reader(cfg)
    with tqdm(total=len(questions), desc="answer", unit="question", dynamic_ncols=True) as bar:
        records, metrics = answer_questions(reader, retriever, questions, cfg.n_docs, cfg.decoding, cfg.batch_size,
                                            decoding_options(cfg), progress=bar)
    metrics = {"source": source, "n_docs": cfg.n_docs, "decoding": cfg.decoding or reader.default_decoding,
               "retrieval": cfg.retrieval if cfg.n_docs else "closed-book",
               "index_version": retriever.version.name if retriever is not None else None, **metrics}
    inputs = [artifact_input(cfg.index)] if cfg.index else []
    inputs += [artifact_input(cfg.reader)] if is_reader(cfg.reader) and (Path(cfg.reader) / "manifest.json").is_file() else []
    inputs += [file_input(cfg.questions, "questions")] if cfg.questions else []
    with staged_output(out, cfg.overwrite) as tmp:
        with open(tmp / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / "metrics.json", metrics)
        manifest = Manifest(stage=STAGE, config=as_dict(cfg), inputs=inputs, counts={"questions": len(records)},
                            metrics=metrics, files={"predictions": PREDICTIONS_FILE, "metrics": "metrics.json"})
        manifest.save(tmp)
    manifest.path = out
    return manifest


def format_prediction(prediction: Prediction, width: int = 160) -> str:
    """The answer, then each passage: rank, prior p(z|x), retrieval score, id, title and text (cut to ``width``)."""
    lines = [f"answer: {prediction.answer}"]
    for rank, passage in enumerate(prediction.passages, 1):
        text = " ".join(passage["text"].split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"  [{rank}] p(z|x)={passage['prior']:.3f} score={passage['score']:.3f} {passage['id']} "
                     f"({passage['title']}): {text}")
    return "\n".join(lines)


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line: EM, F1 and recall of an answer run."""
    parts = [f"{metrics['source']}: {metrics['judged']} questions with answers"]
    for key in ("em", "f1", f"recall@{metrics['n_docs']}"):
        if key in metrics:
            parts.append(f"{key.upper() if key in ('em', 'f1') else key} {metrics[key]:.2f}")
    return ", ".join(parts) + f" ({metrics['retrieval']}, {metrics['decoding']})"
