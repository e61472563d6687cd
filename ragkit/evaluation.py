"""Retrieval metrics, and the ``evaluate`` stage that scores an artifact's runs against its questions.

Three families of metric, each averaged over the questions that can be scored by it:

- **Top-k accuracy** (``accuracy@k``, k = 1, 5, 20, 100): the fraction of questions with answers that have
  a passage among their top k whose *text* contains an answer by DPR's token-level ``has_answer``
  (:mod:`ragkit.answers`). This is the number DPR and pyserini report for NQ/TriviaQA.
- **Gold passages** (``recall@k``, ``mrr@10``), over questions with ``positive_ids``: the fraction of gold
  passages in the top k, and the reciprocal rank of the first gold passage within the top 10.
- **Judged documents** (``ndcg@10``, ``doc_recall@100``), over questions with at least one judged document
  of grade > 0 (BEIR qrels). Passages are mapped to their ``doc_id`` and a document takes the rank of its
  best passage, so a run over windows is scored like a run over whole documents. nDCG uses the graded
  judgement as the gain and ``1 / log2(rank + 1)`` as the discount; the ideal DCG sorts the question's
  judged grades. These are ``trec_eval``'s ``ndcg_cut_10`` and ``recall_100`` as BEIR computes them with
  pytrec_eval, except that ties keep the run's order (trec_eval breaks them by document id).

A question missing from a run counts as having retrieved nothing (``trec_eval -c``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .answers import MatchType, answer_tokens, has_answer, has_answer_tokens
from .artifacts import Manifest, artifact_input, read_upstream, staged_output, write_json_atomic
from .errors import RagkitError

if TYPE_CHECKING:
    from .config import EvaluateConfig

DEFAULT_KS = (1, 5, 20, 100)
MRR_K = 10
NDCG_K = 10
DOC_RECALL_K = 100


# --- pure metric functions ---------------------------------------------------------------------------


def first_answer_rank(answers: Sequence[str], texts: Iterable[str], match_type: MatchType = "string") -> int | None:
    """1-based rank of the first text containing an answer (``has_answer``), or None."""
    for rank, text in enumerate(texts, start=1):
        if has_answer(answers, text, match_type):
            return rank
    return None


def recall_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """Fraction of ``relevant`` found in the top ``k`` of ``ranked``."""
    relevant = set(relevant)
    if not relevant:
        raise ValueError("recall is undefined without relevant items")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant: Iterable[str], k: int = MRR_K) -> float:
    """1 / rank of the first relevant item within the top ``k``; 0 when there is none."""
    relevant = set(relevant)
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def document_ranking(passage_doc_ids: Iterable[str]) -> list[str]:
    """Documents in order of their best-ranked passage (each document once)."""
    return list(dict.fromkeys(passage_doc_ids))


def dcg(gains: Iterable[float]) -> float:
    """Discounted cumulative gain: sum of gain / log2(rank + 1), rank from 1."""
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def ndcg_at_k(ranked_docs: Sequence[str], grades: Mapping[str, float], k: int = NDCG_K) -> float:
    """nDCG@k of a document ranking (no repeats) against graded judgements; grades <= 0 gain nothing."""
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    if not ideal:
        raise ValueError("nDCG is undefined without a document of grade > 0")
    gains = [max(grades.get(doc, 0), 0) for doc in ranked_docs[:k]]
    return dcg(gains) / dcg(ideal)


def question_scores(
    ranked_ids: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    has_answers: bool = False,
    answer_rank: int | None = None,
    positive_ids: Sequence[str] = (),
    ranked_doc_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] = (),
    doc_scores: Sequence[float] = (),
) -> dict[str, float]:
    """One question's metric values, for the families it can be scored by (see the module docstring).

    ``accuracy@k`` when ``has_answers`` (from ``answer_rank``), ``recall@k`` and ``mrr@10`` when it has
    ``positive_ids``, ``ndcg@10`` and ``doc_recall@100`` when a judged document has grade > 0 and
    ``ranked_doc_ids`` is given.
    """
    out: dict[str, float] = {}
    if has_answers:
        for k in ks:
            out[f"accuracy@{k}"] = float(answer_rank is not None and answer_rank <= k)
    if positive_ids:
        for k in ks:
            out[f"recall@{k}"] = recall_at_k(ranked_ids, positive_ids, k)
        out[f"mrr@{MRR_K}"] = reciprocal_rank(ranked_ids, positive_ids, MRR_K)
    grades = {doc: float(score) for doc, score in zip(doc_ids, doc_scores)}
    if ranked_doc_ids is not None and any(g > 0 for g in grades.values()):
        docs = document_ranking(ranked_doc_ids)
        relevant = [doc for doc, g in grades.items() if g > 0]
        out[f"ndcg@{NDCG_K}"] = ndcg_at_k(docs, grades, NDCG_K)
        out[f"doc_recall@{DOC_RECALL_K}"] = recall_at_k(docs, relevant, DOC_RECALL_K)
    return out


def metric_names(questions: Iterable[Mapping[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The metrics these questions can be scored by (answers, gold passages, judged documents)."""
    questions = list(questions)
    names = []
    if any(q["answers"] for q in questions):
        names += [f"accuracy@{k}" for k in ks]
    if any(q["positive_ids"] for q in questions):
        names += [f"recall@{k}" for k in ks] + [f"mrr@{MRR_K}"]
    if any(grade > 0 for q in questions for grade in q["doc_scores"]):
        names += [f"ndcg@{NDCG_K}", f"doc_recall@{DOC_RECALL_K}"]
    return names


def default_metric(names: Sequence[str]) -> str:
    """Top-20 accuracy when questions have answers, else nDCG@10 on judged documents, else recall@20."""
    return next((name for name in ("accuracy@20", "ndcg@10", "recall@20") if name in names), "accuracy@20")


# --- accumulation over questions ---------------------------------------------------------------------


class RetrievalMetrics:
    """Running sums of the per-question metrics; :meth:`result` averages each over its own questions."""

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks!r}")
        self.questions = 0
        self.with_answers = 0
        self.with_positives = 0
        self.with_judgments = 0
        self._sums: dict[str, float] = {}

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value

    def add(self, ranked_ids: Sequence[str], **judgement: Any) -> dict[str, float]:
        """One question: its ranked passage ids and what is known to be right for it; returns its scores.

        ``judgement`` holds :func:`question_scores`' keywords: ``has_answers`` and ``answer_rank`` (the
        1-based rank of the first passage containing an answer, None: none does), ``positive_ids``,
        ``ranked_doc_ids`` (each ranked passage's document, for the document-level metrics), ``doc_ids``
        and ``doc_scores``.
        """
        scores = question_scores(ranked_ids, self.ks, **judgement)
        self.questions += 1
        self.with_answers += f"accuracy@{self.ks[0]}" in scores
        self.with_positives += f"mrr@{MRR_K}" in scores
        self.with_judgments += f"ndcg@{NDCG_K}" in scores
        for key, value in scores.items():
            self._add(key, value)
        return scores

    def merge(self, other: "RetrievalMetrics") -> None:
        """Add another accumulator's questions (e.g. from a worker process) to this one."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge metrics at cut-offs {other.ks} into {self.ks}")
        self.questions += other.questions
        self.with_answers += other.with_answers
        self.with_positives += other.with_positives
        self.with_judgments += other.with_judgments
        for key, total in other._sums.items():
            self._add(key, total)

    def result(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "questions": self.questions,
            "questions_with_answers": self.with_answers,
            "questions_with_positives": self.with_positives,
            "questions_with_judgments": self.with_judgments,
        }
        for key, total in self._sums.items():
            if key.startswith("accuracy@"):
                n = self.with_answers
            elif key.startswith(("recall@", "mrr@")):
                n = self.with_positives
            else:
                n = self.with_judgments
            out[key] = total / n
        return out


def retrieval_metrics(
    questions: Iterable[Mapping[str, Any]],
    rankings: Iterable[Sequence[str]],
    passage_text: Callable[[str], str],
    passage_doc: Callable[[str], str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    match_type: MatchType = "string",
) -> dict[str, float | int]:
    """Metrics of ranked passage ids against questions (rows with answers, positive_ids, doc_ids, doc_scores).

    ``rankings[i]`` is question i's passage ids, best first. ``passage_text(id)`` gives a passage's text
    for top-k accuracy; ``passage_doc(id)`` its document id for the document-level metrics (omitted:
    those metrics are skipped). See the module docstring for the definitions.
    """
    metrics = RetrievalMetrics(ks)
    depth = max(metrics.ks)
    for question, ranked in zip(questions, rankings, strict=True):
        ranked = list(ranked)
        answers = list(question.get("answers") or [])
        rank = first_answer_rank(answers, (passage_text(p) for p in ranked[:depth]), match_type) if answers else None
        metrics.add(
            ranked,
            has_answers=bool(answers),
            answer_rank=rank,
            positive_ids=list(question.get("positive_ids") or []),
            ranked_doc_ids=[passage_doc(p) for p in ranked] if passage_doc is not None else None,
            doc_ids=list(question.get("doc_ids") or []),
            doc_scores=list(question.get("doc_scores") or []),
        )
    return metrics.result()


# --- passages of an ingest artifact ------------------------------------------------------------------


class PassageLookup:
    """Id, text and document of passages by row or id, read from the memory-mapped passages dataset.

    Columns are taken in batches with Arrow, so no Python copy of the corpus is made; the id -> row map
    is built on first use.
    """

    def __init__(self, passages: Any, source: str | Path = "passages") -> None:
        self.passages = passages
        self.source = str(source)
        table = passages.data
        self._ids = table.column("id")
        self._texts = table.column("text")
        self._titles = table.column("title")
        self._docs = table.column("doc_id")
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(cls, ingest_dir: str | Path) -> "PassageLookup":
        import datasets

        path = Path(ingest_dir) / "passages"
        try:
            return cls(datasets.load_from_disk(str(path)), path)
        except FileNotFoundError:
            raise RagkitError(f"{path}: missing passages dataset (rebuild the ingest artifact)") from None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def row_of(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {pid: row for row, pid in enumerate(self._ids.to_pylist())}
        return self._row_of

    def rows(self, passage_ids: Iterable[str], context: str = "") -> list[int]:
        row_of = self.row_of
        out = []
        for pid in passage_ids:
            row = row_of.get(pid)
            if row is None:
                where = f"{context}: " if context else ""
                raise RagkitError(f"{where}passage {pid!r} is not in {self.source} (was it made from another ingest artifact? rebuild it from this one)")
            out.append(row)
        return out

    @staticmethod
    def _take(column: Any, rows: Sequence[int]) -> list:
        import pyarrow as pa

        if len(rows) == 0:
            return []
        return column.take(pa.array(rows, type=pa.int64())).to_pylist()

    def ids_at(self, rows: Sequence[int]) -> list[str]:
        return self._take(self._ids, rows)

    def texts_at(self, rows: Sequence[int]) -> list[str]:
        return self._take(self._texts, rows)

    def titles_at(self, rows: Sequence[int]) -> list[str]:
        return self._take(self._titles, rows)

    def doc_ids_at(self, rows: Sequence[int]) -> list[str]:
        return self._take(self._docs, rows)

    def text(self, passage_id: str) -> str:
        return self._texts[self.rows([passage_id])[0]].as_py()

    def doc_id(self, passage_id: str) -> str:
        return self._docs[self.rows([passage_id])[0]].as_py()


class AnswerMatcher:
    """``has_answer`` over passages by row, caching each passage's tokens (popular passages recur).

    A passage whose token set lacks one of an answer's tokens cannot contain it, so the contiguous
    match (``has_answer_tokens``) only runs where all of them occur; the result is unchanged.
    """

    def __init__(self, passages: PassageLookup, match_type: MatchType = "string", cache_size: int = 100_000) -> None:
        self.passages = passages
        self.match_type = match_type
        self.cache_size = cache_size
        self._tokens: OrderedDict[int, tuple[list[str], frozenset[str]]] = OrderedDict()

    def _tokens_at(self, rows: Sequence[int]) -> list[tuple[list[str], frozenset[str]]]:
        missing = [row for row in dict.fromkeys(rows) if row not in self._tokens]
        if missing:
            for row, text in zip(missing, self.passages.texts_at(missing)):
                tokens = answer_tokens(text)
                self._tokens[row] = (tokens, frozenset(tokens))
        out = []
        for row in rows:
            self._tokens.move_to_end(row)
            out.append(self._tokens[row])
        while len(self._tokens) > self.cache_size:
            self._tokens.popitem(last=False)
        return out

    def flags(self, answers: Sequence[str], rows: Sequence[int]) -> list[bool]:
        """Whether each passage's text contains any answer."""
        if not answers or not rows:
            return [False] * len(rows)
        if self.match_type != "string":
            return [has_answer(answers, text, self.match_type) for text in self.passages.texts_at(rows)]
        keys = [((answer,), frozenset(answer_tokens(answer))) for answer in dict.fromkeys(answers)]
        return [
            any(needed <= vocab and has_answer_tokens(answer, tokens) for answer, needed in keys if needed)
            for tokens, vocab in self._tokens_at(rows)
        ]

    def first_rank(self, answers: Sequence[str], rows: Sequence[int], block: int = 20) -> int | None:
        """1-based rank of the first passage containing an answer, reading texts a block at a time."""
        for start in range(0, len(rows), block):
            flags = self.flags(answers, rows[start : start + block])
            if any(flags):
                return start + flags.index(True) + 1
        return None


# --- the evaluate stage ------------------------------------------------------------------------------


def find_ingest(manifest: Manifest) -> Path:
    """The ingest artifact an artifact descends from, following recorded upstream artifacts."""
    queue = [manifest]
    seen: set[str] = set()
    while queue:
        current = queue.pop(0)
        for item in current.inputs:
            if item.get("kind") != "artifact" or item["path"] in seen:
                continue
            seen.add(item["path"])
            if item.get("stage") == "ingest":
                return Path(item["path"])
            try:
                queue.append(Manifest.load(item["path"]))
            except RagkitError:
                continue
    raise RagkitError(f"{manifest.path}: records no ingest artifact upstream (pass --ingest with the ingest artifact its runs were made from)")


def load_questions(ingest_dir: Path, split: str) -> Any:
    import datasets

    root = Path(ingest_dir) / "questions"
    path = root / split
    if not path.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise RagkitError(f"{path}: the ingest artifact has no '{split}' questions (splits: {', '.join(known) or 'none'})")
    return datasets.load_from_disk(str(path))


def question_record(
    question: Mapping[str, Any], ranked_ids: Sequence[str], answer_rank: int | None,
    ranked_doc_ids: Sequence[str], scores: Mapping[str, float],
) -> dict[str, Any]:
    """One question's line of ``per_question/<run>.<split>.jsonl``: where the right passages ranked.

    ``answer_rank`` / ``answer_hit@k`` when the question has answers; ``gold_rank`` (first gold passage),
    ``gold_ranks`` (every gold passage retrieved), ``gold_passages`` and ``gold_hit@k`` when it has gold
    passages; ``relevant_doc_ranks`` (document ranking) and ``relevant_docs`` when it has judged documents;
    then its metric values (``recall@k``, ``mrr@10``, ``ndcg@10``, ``doc_recall@100``). Ranks are 1-based;
    null: not retrieved (answers are looked for in the top 100 or the deepest cut-off, if deeper).
    """
    record: dict[str, Any] = {"id": question["id"], "retrieved": len(ranked_ids)}
    accuracy = {key: value for key, value in scores.items() if key.startswith("accuracy@")}
    if accuracy:
        record["answer_rank"] = answer_rank
        record.update({f"answer_hit@{key.partition('@')[2]}": bool(value) for key, value in accuracy.items()})
    positives = set(question["positive_ids"] or [])
    if positives:
        ranks = [rank for rank, pid in enumerate(ranked_ids, start=1) if pid in positives]
        record.update(gold_rank=ranks[0] if ranks else None, gold_ranks=ranks, gold_passages=len(positives))
        cutoffs = [int(key.partition("@")[2]) for key in scores if key.startswith("recall@")]
        record.update({f"gold_hit@{k}": bool(ranks) and ranks[0] <= k for k in cutoffs})
    if f"ndcg@{NDCG_K}" in scores:
        relevant = {doc for doc, grade in zip(question["doc_ids"], question["doc_scores"]) if grade > 0}
        docs = document_ranking(ranked_doc_ids)
        record["relevant_doc_ranks"] = [rank for rank, doc in enumerate(docs, start=1) if doc in relevant]
        record["relevant_docs"] = len(relevant)
    record.update({key: value for key, value in scores.items() if key not in accuracy})
    return record


ANSWER_DEPTH = 100
"""Answers are looked for at least this deep, so per-question ranks and the top-k plot reach k = 100."""


def evaluate_run(
    run_path: Path,
    questions: Any,
    passages: PassageLookup,
    ks: Sequence[int] = DEFAULT_KS,
    match_type: MatchType = "string",
    progress: Any = None,
    on_question: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float | int]:
    """Metrics of one TREC run file against one questions split, streaming both.

    ``on_question`` receives each question's :func:`question_record` (in run order, then the questions
    the run lacks).
    """
    import numpy as np

    from .runs import iter_trec

    row_of = {qid: row for row, qid in enumerate(questions["id"])}
    seen = np.zeros(len(row_of), dtype=bool)
    metrics = RetrievalMetrics(ks)
    matcher = AnswerMatcher(passages, match_type)
    depth = max(max(metrics.ks), ANSWER_DEPTH)

    def score(question: Mapping[str, Any], rows: list[int], ranked: list[str]) -> None:
        answers = list(question["answers"] or [])
        answer_rank = matcher.first_rank(answers, rows[:depth]) if answers else None
        ranked_docs = passages.doc_ids_at(rows) if rows else []
        scores = metrics.add(
            ranked,
            has_answers=bool(answers),
            answer_rank=answer_rank,
            positive_ids=list(question["positive_ids"] or []),
            ranked_doc_ids=ranked_docs,
            doc_ids=list(question["doc_ids"] or []),
            doc_scores=list(question["doc_scores"] or []),
        )
        if on_question is not None:
            on_question(question_record(question, ranked, answer_rank, ranked_docs, scores))

    for ranking in iter_trec(run_path):
        row = row_of.get(ranking.question_id)
        if row is None:
            raise RagkitError(f"{run_path}: question {ranking.question_id!r} is not in the ingest questions (was the run made from another ingest artifact?)")
        seen[row] = True
        score(questions[row], passages.rows(ranking.passage_ids, str(run_path)), ranking.passage_ids)
        if progress is not None:
            progress.update(1)
    missing = np.flatnonzero(~seen)
    for row in missing.tolist():
        score(questions[row], [], [])
    result = metrics.result()
    result["questions_without_results"] = int(len(missing))
    return result


def run(cfg: EvaluateConfig) -> Manifest:
    """Score one or several runs against the ingest questions; write metrics, per-question results, a plot.

    With one run ``metrics.json`` maps split -> metrics; with several, run name -> split -> metrics.
    """
    from tqdm.auto import tqdm

    from .comparison import TopKCurves, plot_topk, question_log, resolve_runs
    from .config import as_dict

    sources, ingest_dir, splits = resolve_runs(cfg.runs, cfg.ingest, cfg.splits)
    ingest = read_upstream(ingest_dir, "ingest")
    passages = PassageLookup.open(ingest_dir)
    metrics: dict[str, dict[str, dict[str, float | int]]] = {source.name: {} for source in sources}
    curves: dict[str, dict[str, TopKCurves]] = {source.name: {} for source in sources}
    files: dict[str, str] = {"metrics": "metrics.json"}
    with staged_output(cfg.out, cfg.overwrite) as tmp:
        (tmp / "per_question").mkdir()
        for split in splits:
            questions = load_questions(ingest_dir, split)
            for source in sources:
                name = f"per_question/{source.name}.{split}.jsonl"
                curve = curves[source.name][split] = TopKCurves()
                with question_log(tmp / name, curve) as on_question, \
                        tqdm(total=len(questions), desc=f"evaluate {source.name} {split}", unit="q", leave=False) as bar:
                    metrics[source.name][split] = evaluate_run(
                        source.runs[split], questions, passages, cfg.ks, cfg.match_type, bar, on_question)
                files[f"per_question/{source.name}.{split}"] = name
        files["plot"] = plot_topk(curves, tmp / "topk.png").name
        layout: dict[str, Any] = metrics[sources[0].name] if len(sources) == 1 else metrics
        write_json_atomic(tmp / "metrics.json", layout)
        result = Manifest(
            stage="evaluate",
            config=as_dict(cfg),
            inputs=[source.input() for source in sources] + [artifact_input(ingest_dir, ingest)],
            counts={"questions": {split: metrics[sources[0].name][split]["questions"] for split in splits}},
            metrics=layout,
            files=files,
        )
        result.save(tmp)
    result.path = Path(cfg.out)
    return result


def _column(key: str) -> tuple[int, int, str]:
    """Sort position and header of a metric key (accuracy@20 -> top20, recall@5 -> R@5)."""
    name, _, k = key.partition("@")
    order = ("accuracy", "recall", "mrr", "ndcg", "doc_recall")
    headers = {"accuracy": f"top{k}", "recall": f"R@{k}", "mrr": f"MRR@{k}", "ndcg": f"nDCG@{k}", "doc_recall": f"docR@{k}"}
    return order.index(name), int(k), headers[name]


def _aligned(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows)


def format_table(metrics: Mapping[str, Mapping[str, float | int]]) -> str:
    """A plain-text table, one row per split, one column per metric any split has."""
    keys = sorted({k for m in metrics.values() for k in m if "@" in k}, key=_column)
    header = ["split", "questions"] + [_column(k)[2] for k in keys]
    rows = [[split, str(m["questions"])] + [f"{m[k]:.4f}" if k in m else "-" for k in keys] for split, m in metrics.items()]
    return _aligned([header, *rows])


def format_comparison(metrics: Mapping[str, Mapping[str, Mapping[str, float | int]]]) -> str:
    """One table per split: a row per metric, a column per run (``metrics[run][split][metric]``)."""
    runs = list(metrics)
    splits = list(dict.fromkeys(split for by_split in metrics.values() for split in by_split))
    blocks = []
    for split in splits:
        cells = {run: metrics[run].get(split, {}) for run in runs}
        keys = sorted({k for m in cells.values() for k in m if "@" in k}, key=_column)
        questions = next((m["questions"] for m in cells.values() if "questions" in m), 0)
        rows = [[key, *(f"{cells[run][key]:.4f}" if key in cells[run] else "-" for run in runs)] for key in keys]
        blocks.append(_aligned([[f"{split} ({questions} questions)", *runs], *rows]))
    return "\n\n".join(blocks)
