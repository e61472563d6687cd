"""``ragkit mine``: BM25 retrieval for every question, then positives and hard negatives (DPR recipe).

For each question the top ``depth`` BM25 passages (over ``title + " " + text``) are read in rank order:

- **Positives** are the question's gold ``positive_ids``. A question without gold passages but with
  answers gets the highest-ranked passage whose text contains an answer (DPR's distant supervision).
  A question left without any positive is dropped from the examples and counted in the manifest.
- **Hard negatives** are the highest-ranked passages that are not gold, whose *text* contains no answer
  (token-level ``has_answer``, so "art" in "party" is not a match), and whose document is not judged
  relevant (``doc_ids`` with grade > 0, BEIR qrels). Questions without answers (BEIR) rely on the last
  two filters only. At most ``negatives`` are kept, best first.
- **Given negatives**: hard negatives that came with the questions (DPR JSON ``hard_negative_ctxs``,
  the ingest column ``hard_negative_ids``) are ignored by default; ``given_negatives="first"`` puts them
  ahead of the mined ones (then mined ones fill up to ``negatives``), ``"only"`` keeps just them. They
  pass the same three filters, so the guarantees below hold for every negative.
- **Random negatives** (optional) are drawn uniformly from the corpus under the same filters, with a
  generator seeded by (seed, split, question id), so they do not depend on chunking or worker count.
- **Answer passages** (``answer_passage_ids``) are the positives followed by every top-``depth`` passage
  whose text contains an answer (the check that filters hard negatives), in rank order. Training keeps
  them out of a negative cache; a passage holding the answer that BM25 did not retrieve is not listed.

Everything streams: questions are retrieved ``chunk_size`` at a time and their results appended to the
TREC run, an Arrow stream (turned into the ``examples`` dataset at the end) and the optional DPR JSON.
Passage texts are read from the memory-mapped passages dataset by row. Answer matching and formatting
run in a pool of ``workers`` processes while the main process retrieves the next chunk on ``workers``
threads; the output does not depend on ``workers`` or ``chunk_size``.

The BM25 index is saved under ``bm25/``. A later run with the same BM25 settings over the same ingest
artifact reuses it instead of rebuilding: when it overwrites this artifact, or via ``index_from``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .artifacts import Manifest, artifact_input, read_upstream, staged_output
from .bm25 import BM25Index, Tokenizer
from .errors import RagkitError
from .evaluation import DEFAULT_KS, AnswerMatcher, PassageLookup, RetrievalMetrics, load_questions
from .runs import TrecWriter, format_trec
from .workers import process_pool

if TYPE_CHECKING:
    from .config import MineConfig

RUN_TAG = "ragkit-bm25"
INDEX_FIELDS = "title + ' ' + text"


# --- selection (pure) --------------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """What mining keeps for one question (passage rows into the passages dataset)."""

    positives: list[int]
    hard_negatives: list[int]
    random_negatives: list[int]
    answer_rank: int | None
    """1-based BM25 rank of the first passage containing an answer (None: none in the top depth)."""
    answer_passages: list[int] = dataclasses.field(default_factory=list)
    """Every ranked passage containing an answer, in rank order."""


def select_examples(
    ranked: Sequence[int],
    gold: Sequence[int],
    negatives: int,
    answer_flags: Callable[[Sequence[int]], list[bool]] | None = None,
    judged_relevant: Sequence[bool] | None = None,
    block: int = 32,
) -> Selection:
    """Positives and hard negatives from one question's BM25 ranking (rows, best first).

    ``answer_flags(rows)`` says which passages contain an answer (None: the question has no answers);
    with answers the whole ranking is checked, since every answer-bearing passage is listed. Without,
    scanning stops once enough negatives are found. ``judged_relevant[i]`` marks ranked passages whose
    document is judged relevant.
    """
    gold_set = set(gold)
    positives = list(gold)
    hard: list[int] = []
    answers: list[int] = []
    answer_rank = None
    for start in range(0, len(ranked), block):
        rows = ranked[start : start + block]
        flags = answer_flags(rows) if answer_flags is not None else [False] * len(rows)
        for offset, (row, hit) in enumerate(zip(rows, flags)):
            rank = start + offset + 1
            if hit:
                answers.append(row)
                if answer_rank is None:
                    answer_rank = rank
                    if not gold:
                        positives = [row]
                continue
            if len(hard) < negatives and row not in gold_set and not (judged_relevant is not None and judged_relevant[rank - 1]):
                hard.append(row)
        if len(hard) >= negatives and answer_flags is None:
            break
    return Selection(positives, hard, [], answer_rank, answers)


def draw_random_negatives(
    rng: np.random.Generator,
    num_passages: int,
    count: int,
    exclude: set[int],
    answer_flags: Callable[[Sequence[int]], list[bool]] | None = None,
    judged_relevant: Callable[[Sequence[int]], list[bool]] | None = None,
    rounds: int = 8,
) -> list[int]:
    """Up to ``count`` distinct uniform rows not in ``exclude``, without answers, not judged relevant."""
    chosen: list[int] = []
    taken = set(exclude)
    for _ in range(rounds):
        if len(chosen) >= count:
            break
        candidates = [int(r) for r in dict.fromkeys(rng.integers(0, num_passages, size=2 * (count - len(chosen)) + 4).tolist()) if r not in taken]
        if not candidates:
            continue
        keep = [True] * len(candidates)
        if answer_flags is not None:
            keep = [k and not f for k, f in zip(keep, answer_flags(candidates))]
        if judged_relevant is not None:
            keep = [k and not j for k, j in zip(keep, judged_relevant(candidates))]
        for row, ok in zip(candidates, keep):
            taken.add(row)
            if ok and len(chosen) < count:
                chosen.append(row)
    return chosen


# --- per-chunk work, run inline or in worker processes -----------------------------------------------


@dataclasses.dataclass
class Question:
    """One question with its BM25 results, as handed to a worker."""

    id: str
    question: str
    answers: list[str]
    positive_ids: list[str]
    gold: list[int]
    """Rows of ``positive_ids``."""
    given: list[int]
    """Rows of the hard negatives that came with the question (``hard_negative_ids``)."""
    doc_ids: list[str]
    doc_scores: list[int]
    ranked: np.ndarray
    """(n,) int32 passage rows, best first (n <= depth)."""
    scores: np.ndarray
    """(n,) float32 BM25 scores."""


@dataclasses.dataclass
class ChunkResult:
    """Everything a chunk of questions adds to the outputs, formatted by the worker."""

    trec: str
    examples: dict[str, list]
    dpr: list[str]
    metrics: RetrievalMetrics
    dropped: int = 0
    hard_negatives: int = 0
    fewer_negatives: int = 0


EXAMPLE_COLUMNS = ("id", "question", "answers", "positive_ids", "hard_negative_ids", "random_negative_ids",
                   "answer_passage_ids")


class ChunkMiner:
    """Selects positives and negatives for a chunk of questions and formats every output row.

    Holds its own memory-mapped view of the passages, so it runs the same in the main process or in a
    worker. Passage ids, documents and texts are fetched with one Arrow ``take`` per chunk and column.
    """

    def __init__(self, ingest_dir: str, match_type: str, negatives: int, random_negatives: int, seed: int,
                 export_dpr: bool, ks: Sequence[int], given_negatives: str = "ignore") -> None:
        self.passages = PassageLookup.open(ingest_dir)
        self.matcher = AnswerMatcher(self.passages, match_type)
        self.negatives = negatives
        self.random_negatives = random_negatives
        self.seed = seed
        self.export_dpr = export_dpr
        self.ks = tuple(ks)
        self.given_negatives = given_negatives

    def select(self, split: str, q: Question, ranked_docs: list[str]) -> Selection:
        answer_flags = (lambda rows: self.matcher.flags(q.answers, rows)) if q.answers else None
        relevant = {d for d, s in zip(q.doc_ids, q.doc_scores) if s > 0}
        ranked = q.ranked.tolist()
        judged = [doc in relevant for doc in ranked_docs] if relevant else None
        selection = select_examples(ranked, q.gold, self.negatives, answer_flags, judged)
        if self.given_negatives != "ignore":
            excluded = set(q.gold) | set(selection.positives)
            given = [row for row in dict.fromkeys(q.given) if row not in excluded]
            if given and answer_flags is not None:
                given = [row for row, hit in zip(given, answer_flags(given)) if not hit]
            if given and relevant:
                given = [row for row, doc in zip(given, self.passages.doc_ids_at(given)) if doc not in relevant]
            mined = selection.hard_negatives if self.given_negatives == "first" else []
            selection.hard_negatives = list(dict.fromkeys(given + mined))[: self.negatives]
        if self.random_negatives:
            rng = np.random.default_rng([self.seed, zlib.crc32(f"{split}\0{q.id}".encode("utf-8"))])
            judged_fn = (lambda rows: [d in relevant for d in self.passages.doc_ids_at(rows)]) if relevant else None
            exclude = set(selection.positives) | set(q.gold) | set(selection.hard_negatives)
            selection.random_negatives = draw_random_negatives(
                rng, len(self.passages), self.random_negatives, exclude, answer_flags, judged_fn
            )
        return selection

    def __call__(self, split: str, questions: Sequence[Question]) -> ChunkResult:
        flat = np.concatenate([q.ranked for q in questions]).tolist() if questions else []
        flat_ids, flat_docs = self.passages.ids_at(flat), self.passages.doc_ids_at(flat)
        result = ChunkResult("", {name: [] for name in EXAMPLE_COLUMNS}, [], RetrievalMetrics(self.ks))
        trec, kept = [], []
        offset = 0
        for q in questions:
            n = len(q.ranked)
            ids, docs = flat_ids[offset : offset + n], flat_docs[offset : offset + n]
            offset += n
            trec.append(format_trec(q.id, ids, q.scores.tolist(), RUN_TAG))
            selection = self.select(split, q, docs)
            result.metrics.add(
                ids, has_answers=bool(q.answers), answer_rank=selection.answer_rank, positive_ids=q.positive_ids,
                ranked_doc_ids=docs, doc_ids=q.doc_ids, doc_scores=q.doc_scores,
            )
            if not selection.positives:
                result.dropped += 1
                continue
            result.hard_negatives += len(selection.hard_negatives)
            result.fewer_negatives += len(selection.hard_negatives) < self.negatives
            kept.append((q, selection))
        result.trec = "".join(trec)
        self._examples(kept, result)
        return result

    def _examples(self, kept: list[tuple[Question, Selection]], result: ChunkResult) -> None:
        # Mined positives are rows; gold positives already have ids (and rows, for the DPR texts).
        groups = [(q.gold if q.positive_ids else s.positives, s.hard_negatives, s.random_negatives, s.answer_passages)
                  for q, s in kept]
        rows = [row for group in groups for part in group for row in part]
        ids = iter(self.passages.ids_at(rows))
        texts = None
        if self.export_dpr:
            # The DPR JSON holds positives and both kinds of negatives, not the answer passages.
            shown = [row for group in groups for part in group[:3] for row in part]
            texts = iter(zip(self.passages.titles_at(shown), self.passages.texts_at(shown)))
        out = result.examples
        for (q, _), group in zip(kept, groups):
            part_ids = [[next(ids) for _ in part] for part in group]
            positive_ids = q.positive_ids or part_ids[0]
            answer_ids = list(dict.fromkeys(positive_ids + part_ids[3]))
            for name, value in zip(EXAMPLE_COLUMNS, (q.id, q.question, q.answers, positive_ids, part_ids[1], part_ids[2], answer_ids)):
                out[name].append(value)
            if texts is not None:
                ctxs = [[{"title": t, "text": x, "passage_id": pid} for pid, (t, x) in zip(pids, (next(texts) for _ in pids))]
                        for pids in part_ids[:3]]
                result.dpr.append(json.dumps({
                    "question": q.question, "answers": q.answers, "positive_ctxs": ctxs[0],
                    "negative_ctxs": ctxs[2], "hard_negative_ctxs": ctxs[1],
                }, ensure_ascii=False))


_WORKER: ChunkMiner | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER
    _WORKER = ChunkMiner(*args)


def _mine_in_worker(split: str, questions: list[Question]) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER(split, questions)


# --- outputs -----------------------------------------------------------------------------------------


class ExampleWriter:
    """Appends example rows to an Arrow stream; :meth:`finish` turns it into a saved ``datasets`` split."""

    def __init__(self, stream_path: Path) -> None:
        import pyarrow as pa

        self.schema = pa.schema(
            [("id", pa.string()), ("question", pa.string())]
            + [(name, pa.list_(pa.string())) for name in EXAMPLE_COLUMNS[2:]]
        )
        self.stream_path = stream_path
        self._writer = pa.ipc.new_stream(str(stream_path), self.schema)
        self.rows = 0

    def write(self, columns: dict[str, list]) -> None:
        import pyarrow as pa

        if columns["id"]:
            self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=self.schema))
            self.rows += len(columns["id"])

    def finish(self, target: Path) -> None:
        import datasets

        self._writer.close()
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            datasets.Dataset.from_file(str(self.stream_path)).save_to_disk(str(target))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        self.stream_path.unlink()


class DprWriter:
    """Streams DPR retriever-training JSON: a list of {question, answers, positive_ctxs, ...}."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "w", encoding="utf-8")
        self._handle.write("[")
        self._first = True

    def write(self, item_json: str) -> None:
        self._handle.write(("\n" if self._first else ",\n") + item_json)
        self._first = False

    def close(self) -> None:
        self._handle.write("\n]\n")
        self._handle.close()


# --- the stage ---------------------------------------------------------------------------------------


def _passage_texts(passages: PassageLookup, batch_size: int = 10_000) -> Iterator[str]:
    for batch in passages.passages.iter(batch_size=batch_size):
        for title, text in zip(batch["title"], batch["text"]):
            yield f"{title} {text}"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _expected_index(cfg: MineConfig, tokenizer: Tokenizer, passages: int, ingest_sha: str) -> dict[str, Any]:
    return {
        "backend": cfg.backend, "method": cfg.method, "k1": float(cfg.k1), "b": float(cfg.b),
        "tokenizer": tokenizer.settings(), "passages": passages, "fields": INDEX_FIELDS,
        "ingest_manifest_sha256": ingest_sha,
    }


def _reusable_index(cfg: MineConfig, expected: dict[str, Any]) -> Path | None:
    """A saved index built with the same settings from the same ingest artifact, if one is at hand."""
    if cfg.index_from:
        source = Path(cfg.index_from)
        read_upstream(source, "mine")
        saved = BM25Index.read_config(source / "bm25")
        differing = sorted(k for k in expected if saved.get(k) != expected[k])
        if differing:
            raise RagkitError(
                f"{source}/bm25: was built with other {', '.join(differing)} than this run asks for "
                f"(match those settings or drop --index-from to build a new index)"
            )
        return source
    previous = Path(cfg.out) / "bm25"
    if cfg.overwrite and (previous / "config.json").is_file():
        try:
            saved = BM25Index.read_config(previous)
        except RagkitError:
            return None
        if all(saved.get(k) == v for k, v in expected.items()):
            return Path(cfg.out)
    return None


def _start_workers(workers: int, miner_args: tuple) -> ProcessPoolExecutor:
    """Worker processes, started before this process runs any thread of its own.

    On Linux they are forked (cheap, and needs no ``if __name__ == "__main__"`` guard in the caller's
    script); forking is only safe while no other thread holds a lock, hence before the BM25 top-k
    threads and progress bars exist. Elsewhere they are spawned. Either way they exit if this process dies.
    """
    executor = process_pool(workers, _init_worker, miner_args)
    executor.submit(int).result()  # with fork, the first task starts every worker
    return executor


def run(cfg: MineConfig) -> Manifest:
    """Mine every questions split of ``cfg.ingest``; write the mine artifact to ``cfg.out``."""
    from tqdm.auto import tqdm

    from .config import as_dict

    ingest_dir = Path(cfg.ingest)
    ingest = read_upstream(ingest_dir, "ingest")
    ingest_ref = artifact_input(ingest_dir, ingest)
    question_root = ingest_dir / "questions"
    available = sorted(p.name for p in question_root.iterdir() if p.is_dir()) if question_root.is_dir() else []
    splits = list(cfg.splits) or available
    for split in splits:
        if split not in available:
            raise RagkitError(f"{question_root}: has no '{split}' split (splits: {', '.join(available) or 'none'})")
    if not splits:
        raise RagkitError(f"{ingest_dir}: has no question splits to mine (ingest a question file with the corpus)")

    passages = PassageLookup.open(ingest_dir)
    if len(passages) == 0:
        raise RagkitError(f"{ingest_dir}/passages: is empty (ingest a corpus with at least one passage)")
    workers = cfg.workers or os.cpu_count() or 1
    tokenizer = Tokenizer(stopwords=cfg.stopwords, stem=cfg.stem)
    expected = _expected_index(cfg, tokenizer, len(passages), ingest_ref["manifest_sha256"])
    reuse = _reusable_index(cfg, expected)
    inputs = [ingest_ref]
    if reuse is not None and cfg.index_from:
        inputs.append(artifact_input(reuse))

    # Accuracy at a cut-off deeper than the run would only repeat accuracy@depth.
    ks = [k for k in DEFAULT_KS if k <= cfg.depth] or [cfg.depth]
    miner_args = (str(ingest_dir), cfg.match_type, cfg.negatives, cfg.random_negatives, cfg.seed, cfg.export_dpr, ks,
                  cfg.given_negatives)
    executor = _start_workers(workers, miner_args) if workers > 1 else None
    miner = ChunkMiner(*miner_args) if executor is None else None
    counts: dict[str, Any] = {"passages": len(passages)}
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {"bm25": "bm25"}
    try:
        with staged_output(cfg.out, cfg.overwrite) as tmp:
            bm25_dir = tmp / "bm25"
            if reuse is not None:
                shutil.copytree(reuse / "bm25", bm25_dir, copy_function=_link_or_copy)
                index = BM25Index.load(bm25_dir, threads=workers)
            else:
                index = BM25Index.create(cfg.backend, tokenizer, cfg.method, cfg.k1, cfg.b, threads=workers)
                with tqdm(total=len(passages), desc="BM25 index", unit="passage", leave=False) as bar:
                    index.index(_passage_texts(passages), progress=bar)
                index.save(bm25_dir, {k: expected[k] for k in ("fields", "ingest_manifest_sha256")})
            counts["bm25_reused"] = reuse is not None
            counts["bm25_terms"] = index.vocabulary_size

            for name in ("examples", "runs") + (("dpr",) if cfg.export_dpr else ()):
                (tmp / name).mkdir()
            for key in ("questions", "examples", "dropped_without_positive", "mean_hard_negatives", "fewer_hard_negatives"):
                counts[key] = {}
            for split in splits:
                split_counts, split_metrics = _mine_split(cfg, split, ingest_dir, passages, index, tmp, miner, executor, workers, ks)
                for key, value in split_counts.items():
                    counts[key][split] = value
                metrics[split] = split_metrics
                files[f"examples/{split}"] = f"examples/{split}"
                files[f"runs/{split}"] = f"runs/{split}.trec"
                if cfg.export_dpr:
                    files[f"dpr/{split}"] = f"dpr/{split}.json"

            config = as_dict(cfg)
            config["bm25"] = index.settings()
            config["filters"] = {
                "hard_negative_answer_match": f"has_answer ({cfg.match_type}) over passage text",
                "exclude_gold_positives": True,
                "exclude_judged_relevant_documents": "doc_scores > 0",
                "given_negatives": cfg.given_negatives,
                "positive_without_gold": "highest-ranked passage containing an answer",
                "answer_passages": "positives + every top-depth passage containing an answer",
            }
            manifest = Manifest(stage="mine", config=config, inputs=inputs, counts=counts, metrics=metrics, files=files)
            manifest.save(tmp)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    manifest.path = Path(cfg.out)
    return manifest


def _mine_split(
    cfg: MineConfig,
    split: str,
    ingest_dir: Path,
    passages: PassageLookup,
    index: BM25Index,
    tmp: Path,
    miner: ChunkMiner | None,
    executor: ProcessPoolExecutor | None,
    workers: int,
    ks: Sequence[int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Retrieve chunk i+1 here while the workers select and format chunk i; write results in order."""
    from tqdm.auto import tqdm

    questions = load_questions(ingest_dir, split)
    missing = {"id", "question", "answers", "positive_ids", "hard_negative_ids", "doc_ids", "doc_scores"} - set(questions.column_names)
    if missing:
        raise RagkitError(f"{ingest_dir}/questions/{split}: lacks column(s) {', '.join(sorted(missing))} (rebuild the ingest artifact with this ragkit)")
    source = f"{ingest_dir}/questions/{split}"
    metrics = RetrievalMetrics(ks)
    examples = ExampleWriter(tmp / "examples" / f".{split}.arrow")
    dpr = DprWriter(tmp / "dpr" / f"{split}.json") if cfg.export_dpr else None
    totals = {"dropped": 0, "hard": 0, "fewer": 0}

    def submit(chunk: list[Question]) -> list[Any]:
        if executor is None:
            assert miner is not None
            return [miner(split, chunk)]
        share = -(-len(chunk) // workers)
        return [executor.submit(_mine_in_worker, split, chunk[i : i + share]) for i in range(0, len(chunk), share)]

    def write(pending: list[Any], bar: Any) -> None:
        for item in pending:
            result: ChunkResult = item if executor is None else item.result()
            runs.write_text(result.trec)
            examples.write(result.examples)
            if dpr is not None:
                for item_json in result.dpr:
                    dpr.write(item_json)
            metrics.merge(result.metrics)
            totals["dropped"] += result.dropped
            totals["hard"] += result.hard_negatives
            totals["fewer"] += result.fewer_negatives
            bar.update(result.metrics.questions)

    try:
        with TrecWriter(tmp / "runs" / f"{split}.trec", RUN_TAG) as runs, \
                tqdm(total=len(questions), desc=f"mine {split}", unit="q", leave=False) as bar:
            previous = None
            for start in range(0, len(questions), cfg.chunk_size):
                batch = questions[start : start + cfg.chunk_size]
                rows, scores = index.search(batch["question"], cfg.depth)  # (B, depth), (B, depth)
                chunk = []
                for i, qid in enumerate(batch["id"]):
                    valid = rows[i] >= 0
                    positive_ids = list(batch["positive_ids"][i] or [])
                    given = list(batch["hard_negative_ids"][i] or []) if cfg.given_negatives != "ignore" else []
                    chunk.append(Question(
                        id=qid, question=batch["question"][i], answers=list(batch["answers"][i] or []),
                        positive_ids=positive_ids, gold=passages.rows(positive_ids, f"{source}: question {qid!r}"),
                        given=passages.rows(given, f"{source}: question {qid!r}"),
                        doc_ids=list(batch["doc_ids"][i] or []), doc_scores=list(batch["doc_scores"][i] or []),
                        ranked=rows[i][valid].astype(np.int32), scores=scores[i][valid],
                    ))
                pending = submit(chunk)
                if previous is not None:
                    write(previous, bar)
                previous = pending
            if previous is not None:
                write(previous, bar)
    finally:
        if dpr is not None:
            dpr.close()
    examples.finish(tmp / "examples" / split)
    n_examples = examples.rows
    split_counts = {
        "questions": len(questions),
        "examples": n_examples,
        "dropped_without_positive": totals["dropped"],
        "mean_hard_negatives": totals["hard"] / n_examples if n_examples else 0.0,
        "fewer_hard_negatives": totals["fewer"],
    }
    return split_counts, metrics.result()
