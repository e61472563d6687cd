"""``ragkit hybrid``: fuse the runs of two artifacts (dense and BM25) into hybrid runs.

Reads ``runs/<split>.trec`` from both artifacts (any stage that writes runs: mine, index, hybrid), which
must descend from the same ingest artifact, and writes ``runs/<split>.trec`` with the fused rankings
(:mod:`ragkit.indexing.fusion`; tag ``ragkit-hybrid``).

For linear fusion without a given alpha, alpha is **tuned on a split that is not reported**: the tune
split (``validation`` when both artifacts have runs for it, else ``train``), on a seeded sample of at most
``tune_max_questions`` questions. Every alpha of the grid ranks the sample's union of candidates, each
ranking is scored with :mod:`ragkit.evaluation`'s metric code, and the alpha with the best value of the
tune metric wins (the smallest one among equals). Only then are the reported splits fused, with that
alpha; their questions are never read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..artifacts import Manifest, artifact_input, read_upstream, staged_output
from ..errors import RagkitError
from ..evaluation import (
    DEFAULT_KS,
    AnswerMatcher,
    PassageLookup,
    RetrievalMetrics,
    default_metric,
    find_ingest,
    load_questions,
    metric_names,
)
from ..runs import Ranking, TrecWriter, iter_trec
from .fusion import Candidates, candidates, fuse_rankings, linear_order

if TYPE_CHECKING:
    from ..config import HybridConfig

RUN_TAG = "ragkit-hybrid"
RUN_STAGES = ("mine", "index", "hybrid")


@dataclasses.dataclass
class JudgedCandidates:
    """One tune question's candidates with what is known about each: answer match and document."""

    question: Mapping[str, Any]
    candidates: Candidates
    answer_flags: np.ndarray
    """(N,) whether each candidate's text contains an answer."""
    doc_ids: list[str]


def grid_metrics(judged: Iterable[JudgedCandidates], alphas: Sequence[float], depth: int,
                 ks: Sequence[int] = DEFAULT_KS) -> list[dict[str, float | int]]:
    """The metrics of the linear fusion at each alpha, over the judged questions (one dict per alpha)."""
    grid = np.asarray(alphas, dtype=np.float64)  # (A,)
    totals = [RetrievalMetrics(ks) for _ in alphas]
    for item in judged:
        question, c = item.question, item.candidates
        orders = linear_order(c, grid, depth)  # (A, min(N, depth))
        for metrics, order in zip(totals, orders):
            flags = item.answer_flags[order]  # (n,)
            metrics.add(
                [c.passage_ids[i] for i in order],
                has_answers=bool(question["answers"]),
                answer_rank=int(np.argmax(flags)) + 1 if flags.any() else None,
                positive_ids=list(question["positive_ids"] or []),
                ranked_doc_ids=[item.doc_ids[i] for i in order],
                doc_ids=list(question["doc_ids"] or []),
                doc_scores=list(question["doc_scores"] or []),
            )
    return [metrics.result() for metrics in totals]


def choose_alpha(alphas: Sequence[float], values: Sequence[float]) -> float:
    """The alpha with the highest value; the smallest one when several share it."""
    best = max(values)
    return min(alpha for alpha, value in zip(alphas, values) if value == best)


# --- the stage ---------------------------------------------------------------------------------------


def _open(path: str) -> tuple[Path, Manifest, dict[str, Path]]:
    directory = Path(path)
    manifest = read_upstream(directory, RUN_STAGES)
    runs_dir = directory / "runs"
    runs = {p.stem: p for p in sorted(runs_dir.glob("*.trec"))} if runs_dir.is_dir() else {}
    if not runs:
        raise RagkitError(f"{runs_dir}: holds no runs (run `ragkit {manifest.stage}` with --split for the splits to fuse)")
    return directory, manifest, runs


def _tune_split(cfg: HybridConfig, sources: Sequence[tuple[Path, Manifest, dict[str, Path]]]) -> str:
    split = cfg.tune_split or ("validation" if all("validation" in runs for _, _, runs in sources) else "train")
    for directory, _, runs in sources:
        if split not in runs:
            raise RagkitError(
                f"{directory}: has no run for the tune split '{split}' (produce runs for it, e.g. "
                f"`ragkit mine INGEST --split {split}` or `ragkit index ... --split {split}`, or pass --alpha)"
            )
    return split


def _reported_splits(cfg: HybridConfig, sources: Sequence[tuple[Path, Manifest, dict[str, Path]]],
                     tune_split: str | None) -> list[str]:
    if cfg.splits:
        for split in cfg.splits:
            if split == tune_split:
                raise RagkitError(f"split '{split}' is the split alpha is tuned on and cannot be reported (pass another --tune-split, or --alpha)")
            for directory, _, runs in sources:
                if split not in runs:
                    raise RagkitError(f"{directory}/runs: has no run for split '{split}' (runs: {', '.join(runs)})")
        return list(cfg.splits)
    common = sorted(set(sources[0][2]) & set(sources[1][2]) - {tune_split})
    if not common:
        but = f" besides the tune split '{tune_split}'" if tune_split else ""
        raise RagkitError(f"{sources[0][0]} and {sources[1][0]}: no split with runs in both{but} (produce runs for a split to report, e.g. --split dev)")
    return common


def _sample(questions: Any, limit: int, seed: int) -> list[int]:
    """Rows of at most ``limit`` questions, a seeded uniform sample in row order."""
    if len(questions) <= limit:
        return list(range(len(questions)))
    return sorted(int(r) for r in np.random.default_rng(seed).choice(len(questions), size=limit, replace=False))


def tune(cfg: HybridConfig, ingest_dir: Path, split: str, dense_run: Path, sparse_run: Path) -> dict[str, Any]:
    """Pick alpha on ``split``: the grid's metrics over a sample of its questions and the best alpha."""
    questions = load_questions(ingest_dir, split)
    rows = _sample(questions, cfg.tune_max_questions, cfg.seed)
    sample = [questions[r] for r in rows]
    names = metric_names(sample)
    if not names:
        raise RagkitError(f"{ingest_dir}/questions/{split}: its questions have no answers, gold passages or judged documents to tune alpha on (pass --alpha)")
    metric = default_metric(names) if cfg.tune_metric == "auto" else cfg.tune_metric
    if metric not in names:
        raise RagkitError(f"tune_metric={metric!r} cannot be computed on the '{split}' questions (available: {', '.join(names)})")

    wanted = {q["id"] for q in sample}
    kept: list[dict[str, Ranking]] = []
    for path in (dense_run, sparse_run):
        kept.append({r.question_id: r for r in iter_trec(path) if r.question_id in wanted})
    passages = PassageLookup.open(ingest_dir)
    matcher = AnswerMatcher(passages, cfg.match_type)

    def judged() -> Iterable[JudgedCandidates]:
        for question in sample:
            c = candidates(kept[0].get(question["id"]), kept[1].get(question["id"]), cfg.depth, cfg.normalize)
            where = f"{dense_run} or {sparse_run}"
            passage_rows = passages.rows(c.passage_ids, where)
            flags = np.array(matcher.flags(list(question["answers"] or []), passage_rows), dtype=bool)  # (N,)
            yield JudgedCandidates(question, c, flags, passages.doc_ids_at(passage_rows))

    results = grid_metrics(judged(), cfg.alpha_grid, cfg.depth)
    values = [float(r[metric]) for r in results]
    alpha = choose_alpha(cfg.alpha_grid, values)
    return {
        "split": split,
        "metric": metric,
        "questions": len(sample),
        "of_questions": len(questions),
        "seed": cfg.seed,
        "alpha": alpha,
        "value": max(values),
        "grid": [[a, v] for a, v in zip(cfg.alpha_grid, values)],
    }


def run(cfg: HybridConfig) -> Manifest:
    """Fuse the runs of ``cfg.dense`` and ``cfg.bm25``; write the hybrid artifact to ``cfg.out``."""
    from tqdm.auto import tqdm

    from ..config import as_dict

    sources = [_open(cfg.dense), _open(cfg.bm25)]
    ingests = [find_ingest(manifest).resolve() for _, manifest, _ in sources]
    if ingests[0] != ingests[1]:
        raise RagkitError(
            f"{cfg.bm25}: was made from ingest artifact {ingests[1]}, {cfg.dense} from {ingests[0]}; "
            f"fuse runs of one ingest artifact"
        )
    ingest_dir = ingests[0]
    ingest = read_upstream(ingest_dir, "ingest")
    tune_split = _tune_split(cfg, sources) if cfg.tuned else None
    splits = _reported_splits(cfg, sources, tune_split)

    tuning = tune(cfg, ingest_dir, tune_split, sources[0][2][tune_split], sources[1][2][tune_split]) if tune_split else None
    alpha = tuning["alpha"] if tuning else (cfg.alpha if cfg.method == "linear" else None)
    counts: dict[str, Any] = {"questions": {}}
    files: dict[str, str] = {}
    with staged_output(cfg.out, cfg.overwrite) as tmp:
        (tmp / "runs").mkdir()
        for split in splits:
            with TrecWriter(tmp / "runs" / f"{split}.trec", RUN_TAG) as writer, \
                    tqdm(desc=f"fuse {split}", unit="q", leave=False) as bar:
                fused = fuse_rankings(iter_trec(sources[0][2][split]), iter_trec(sources[1][2][split]), cfg.method,
                                      alpha or 0.0, cfg.depth, cfg.normalize, cfg.rrf_k)
                n = 0
                for ranking in fused:
                    writer.write(ranking.question_id, ranking.passage_ids, ranking.scores)
                    n += 1
                    bar.update(1)
            counts["questions"][split] = n
            files[f"runs/{split}"] = f"runs/{split}.trec"
        config = as_dict(cfg)
        config["alpha_used"] = alpha
        metrics: dict[str, Any] = {
            "method": cfg.method,
            "alpha": alpha,
            "alpha_chosen_by": "tuned" if tuning else ("given" if cfg.method == "linear" else None),
        }
        if tuning:
            metrics["tuning"] = tuning
        manifest = Manifest(
            stage="hybrid",
            config=config,
            inputs=[artifact_input(d, m) | {"role": role} for (d, m, _), role in zip(sources, ("dense", "bm25"))]
            + [artifact_input(ingest_dir, ingest)],
            counts=counts,
            metrics=metrics,
            files=files,
        )
        manifest.save(tmp)
    manifest.path = Path(cfg.out)
    return manifest
