"""Evaluation on the dev questions during training: the passages they are searched in, and the metrics.

The dev questions (the ingest artifact's ``questions/dev``, else the mine artifact's ``examples/dev``) and the
passages are encoded the way ``ragkit index`` encodes them (:mod:`ragkit.indexing.encode`: passages into a
temporary memory-mapped matrix) and ranked by an exact in-memory FAISS ``Flat`` index
(:mod:`ragkit.indexing.faiss_index`), by inner product or cosine. Beyond ``eval_max_passages``
passages the search runs over a subset that always holds every dev question's positives, the passages of
its judged documents and its BM25 candidates from the mine run, filled up with a seeded random sample:
BM25's top-100 lies inside that subset, so BM25's numbers are unchanged on it, while the dense
retriever's are optimistic compared with the full corpus.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation import DEFAULT_KS, PassageLookup, default_metric, metric_names, retrieval_metrics
from ..indexing.encode import PassageTexts, encode_passages, encode_queries, open_embeddings
from ..indexing.faiss_index import build_index
from .encoder import BiEncoder

EVAL_DEPTH = 100


class DevEvaluation:
    """The dev questions and the passages they are searched in, fixed for the whole run."""

    def __init__(self, questions: Any, passages: PassageLookup, bm25_run: Path | None, max_passages: int,
                 seed: int, match_type: str) -> None:
        columns = questions.column_names
        self.questions = [
            {
                "id": row["id"],
                "question": row["question"],
                "answers": list(row.get("answers") or []),
                "positive_ids": list(row.get("positive_ids") or []),
                "doc_ids": list(row.get("doc_ids") or []) if "doc_ids" in columns else [],
                "doc_scores": list(row.get("doc_scores") or []) if "doc_scores" in columns else [],
            }
            for row in questions
        ]
        self.match_type = match_type
        self.judged = any(q["doc_ids"] for q in self.questions)
        rows = self._passage_rows(passages, bm25_run, max_passages, seed)
        self.passage_ids = passages.ids_at(rows)
        self.titles = passages.titles_at(rows)
        self.texts = passages.texts_at(rows)
        self.doc_ids = passages.doc_ids_at(rows)
        self.subset = len(rows) < len(passages)

    def _passage_rows(self, passages: PassageLookup, bm25_run: Path | None, max_passages: int, seed: int) -> list[int]:
        total = len(passages)
        if total <= max_passages:
            return list(range(total))
        wanted = {pid for q in self.questions for pid in q["positive_ids"]}
        required = set(passages.rows([pid for pid in wanted if pid in passages.row_of], "dev positives"))
        judged = {doc for q in self.questions for doc, grade in zip(q["doc_ids"], q["doc_scores"]) if grade > 0}
        if judged:
            docs = passages.doc_ids_at(list(range(total)))
            required.update(row for row, doc in enumerate(docs) if doc in judged)
        if bm25_run is not None and bm25_run.is_file():
            from ..runs import iter_trec

            dev_ids = {q["id"] for q in self.questions}
            for ranking in iter_trec(bm25_run):
                if ranking.question_id in dev_ids:
                    required.update(passages.rows(ranking.passage_ids[:EVAL_DEPTH], str(bm25_run)))
        fill = max_passages - len(required)
        if fill > 0:
            rng = np.random.default_rng(seed)
            candidates = rng.permutation(total)
            extra = [int(r) for r in candidates[: fill + len(required)] if int(r) not in required][:fill]
            required.update(extra)
        return sorted(required)

    @property
    def default_metric(self) -> str:
        """Top-20 accuracy when questions have answers, else nDCG@10 on judged documents, else recall@20."""
        return default_metric(self.metric_names())

    def metric_names(self) -> list[str]:
        """The metrics these questions can be scored by (answers, gold passages, judged documents)."""
        return metric_names(self.questions, DEFAULT_KS)

    def evaluate(self, model: BiEncoder, tokenizer: Any, autocast_dtype: torch.dtype | None, batch_size: int,
                 query_max_length: int, passage_max_length: int, similarity: str = "dot") -> dict[str, Any]:
        """Retrieval metrics of ``model`` (on its own device) ranking the passages for every dev question by
        ``similarity``; the model's training mode is left as it was."""
        passages = PassageTexts(self.passage_ids, self.titles, self.texts)
        with tempfile.TemporaryDirectory(prefix="ragkit-dev-") as tmp:
            encode_passages(model, tokenizer, passages, tmp, passage_max_length, batch_size=batch_size,
                            autocast_dtype=autocast_dtype)
            embeddings = open_embeddings(tmp)  # (P, D)
            index, _ = build_index("Flat", embeddings, np.arange(len(passages)), similarity)
            del embeddings
        queries = encode_queries(model, tokenizer, [q["question"] for q in self.questions], query_max_length,
                                 batch_size=batch_size, autocast_dtype=autocast_dtype)  # (Q, D)
        _, ranked = index.search(queries, min(EVAL_DEPTH, len(passages)))  # (Q, depth)
        rankings = [[self.passage_ids[i] for i in row] for row in ranked.tolist()]
        position = {pid: i for i, pid in enumerate(self.passage_ids)}
        metrics = retrieval_metrics(
            self.questions, rankings,
            passage_text=lambda pid: self.texts[position[pid]],
            passage_doc=(lambda pid: self.doc_ids[position[pid]]) if self.judged else None,
            ks=DEFAULT_KS, match_type=self.match_type,
        )
        metrics["passages_searched"] = len(self.passage_ids)
        return metrics
