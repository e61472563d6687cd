"""``ragkit train retriever``: fine-tune a dual encoder on the examples of a mine artifact.

One training step: the sampler hands this process its share of a global batch of questions, each with
one positive and ``N`` hard negatives (:mod:`ragkit.retriever.data`); the towers encode them; the
representations of every process are gathered and one :class:`ContrastiveLoss` scores every question
against every passage of the global batch. The same loss object serves the plain step and the gradient
cache (``chunk_size > 0``), so temperature, similarity and guide masking cannot differ between the two.
AdamW (no weight decay on biases and normalisation weights), linear warm-up then linear decay, gradient
clipping (after unscaling under fp16), bf16/fp16 autocast.

Two options change what the loss sees. A guide model (GISTEmbed, ``guide``) is frozen; its embeddings of
the batch's questions and passages are computed without gradient, cached per question id and passage
for the whole run, and passed to the loss, which drops in-batch candidates the guide rates above the
positive. A negative cache (``negative_cache``) adds passages of earlier steps to every question's softmax
through the sampled estimator of :mod:`ragkit.retriever.negative_cache`. That estimator keeps the
in-batch partition of the chosen loss (DPR or GTE) and runs on the plain step or the gradient cache; it
does not combine with a guide, which would have to score every cached passage to mask the cache's softmax.
A question's positives and the passages mining found to contain its answer are kept out of its cache
softmax (the draw and the partition alike). Mining only checks the passages BM25 retrieved for it (its top
``depth``): an answer-bearing passage BM25 missed is not known, so it is not masked and can still act as a
false negative from the cache. Each step's log record adds ``cache_size`` (passages the step's queries
competed against) and ``cache_staleness`` (:func:`~ragkit.retriever.negative_cache.staleness` of the drawn
items' cached embeddings against their re-encoding; null while nothing could be drawn).

Runs survive a crash. Everything in progress lives in a work directory next to the output,
``<out parent>/.<out name>.work/``: the per-step log ``metrics.jsonl``, the best model so far and
``checkpoints/step-K/`` (model, optimiser, schedule, gradient scaler, every process's random state and
the data position, and the negative cache with its generators). ``--resume`` continues from the latest
checkpoint and ends with exactly the weights an uninterrupted run would have (with a guide, up to the
guide's embeddings, which are recomputed in batches padded differently and may differ in the last bit,
flipping a mask only at an exact tie). When training ends, the kept model, the log and the manifest are
moved into ``<out>`` in one rename and the work directory is removed.

Evaluation on the dev questions (the ingest artifact's ``questions/dev``, else the mine artifact's
``examples/dev``) encodes the questions and the passages and ranks them by exact inner product. Beyond
``eval_max_passages`` passages the search runs over a subset that always holds every dev question's
positives, the passages of its judged documents and its BM25 candidates from the mine run, filled up with
a seeded random sample: BM25's top-100 lies inside that subset, so BM25's numbers are unchanged on it,
while the dense retriever's are optimistic compared with the full corpus. The model with the best
``select_metric`` is the one kept.

Under ``torchrun`` every process trains; logging, evaluation, checkpoints and the artifact are the
first process's work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..artifacts import Manifest, artifact_input, hash_file, read_upstream, staged_output
from ..config import TrainRetrieverConfig, as_dict
from ..errors import RagkitError
from ..evaluation import DEFAULT_KS, PassageLookup, retrieval_metrics
from .data import Batch, BatchCollator, ResumableBatchSampler, RetrievalExamples
from .distributed import (DistInfo, barrier, cleanup_distributed, gather_no_grad, gather_with_grad, global_loss,
                          init_distributed, is_distributed)
from .encoder import BiEncoder, RetrieverSpec, load_tokenizer, tokenize_passages, tokenize_queries
from .gradcache import GradCache, full_batch_step, split_inputs
from .losses import DIRECTIONS, ContrastiveLoss
from .negative_cache import CacheDraw, NegativeCache, cache_loss, distributed_draw, refresh_drawn, staleness

STAGE = "train-retriever"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
STATE_FILE = "training_state.pt"
EVAL_DEPTH = 100
LOSS_DIRECTIONS = {"dpr": ("query_to_passage",), "gte": DIRECTIONS}
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_CHANGES = ("resume", "overwrite", "checkpoint_every", "device")


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    start_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


def run(cfg: TrainRetrieverConfig, on_step: Callable[[int], None] | None = None) -> Manifest:
    """Train a retriever on ``cfg.mine`` and write the ``train-retriever`` artifact to ``cfg.out``.

    ``on_step(step)`` is called after every completed step, once that step's evaluation and checkpoint
    are written; an exception it raises stops training as a crash would, leaving the run resumable.
    """
    from transformers.utils import logging as transformers_logging

    # Its per-save and per-load bars would interleave with the training bar.
    transformers_logging.disable_progress_bar()
    joined_here = not is_distributed()
    dist_info = init_distributed()
    try:
        return Trainer(cfg, dist_info).train(on_step)
    finally:
        if joined_here:
            cleanup_distributed()


def resolve_device(requested: str, dist_info: DistInfo) -> torch.device:
    """The training device: torchrun's per-process device, else ``cuda`` when available for ``auto``."""
    if dist_info.world_size > 1:
        return dist_info.device
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RagkitError(f"device={requested!r} but no CUDA device is available (use --device cpu or auto)")
    return torch.device(requested)


def work_dir_for(out: str | Path) -> Path:
    """The stable directory an in-progress run keeps its checkpoints and log in."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: biases and normalisation weights (the 1-D parameters) get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of optimiser step ``step`` (0-based): linear up to 1 at ``warmup_steps``, then
    linear down to ``1 / (total - warmup)`` at the last step; never 0, so no step is wasted."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(total_steps - step, 1) / max(total_steps - warmup_steps, 1)


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    return int(round(warmup * total_steps)) if warmup < 1 else min(int(warmup), total_steps)


# --- random state ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as plain values ``torch.load`` reads safely."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the guide (GISTEmbed) ---------------------------------------------------------------------------


class GuideEncoder:
    """A frozen model whose embeddings decide which in-batch candidates the loss drops as false negatives.

    It never receives a gradient. Embeddings are computed in chunks, kept per question id and passage
    row for the whole run (each is encoded once however often it recurs), and handed to the loss, which
    gathers them across processes like the trained representations.
    """

    def __init__(self, name: str, device: torch.device, chunk_size: int, query_max_length: int,
                 passage_max_length: int, autocast_dtype: torch.dtype | None) -> None:
        self.model = BiEncoder.from_pretrained(name).to(device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(name)
        self.device = device
        self.chunk_size = chunk_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.autocast_dtype = autocast_dtype
        self.queries: dict[str, Tensor] = {}
        self.passages: dict[int, Tensor] = {}

    @torch.no_grad()  # not inference_mode: the loss builds its masks from these inside the training graph
    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        query = self._embed(self.queries, batch.query_ids, "query",
                            lambda i: tokenize_queries(self.tokenizer, [batch.questions[j] for j in i], self.query_max_length))
        passage = self._embed(self.passages, batch.passage_rows, "passage",
                              lambda i: tokenize_passages(self.tokenizer, [batch.titles[j] for j in i],
                                                          [batch.texts[j] for j in i], self.passage_max_length))
        return {"guide_query": query, "guide_passage": passage}  # (B, D'), (B * G, D')

    def _embed(self, cache: dict, keys: list, tower: str, tokenize: Callable[[list[int]], dict[str, Tensor]]) -> Tensor:
        missing = list({key: i for i, key in enumerate(keys) if key not in cache}.values())
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            inputs = {k: v.to(self.device) for k, v in tokenize(chunk).items()}
            with _autocast(self.device, self.autocast_dtype):
                vectors = self.model(**inputs, tower=tower).float()  # (c, D')
            for i, vector in zip(chunk, vectors.cpu()):
                cache[keys[i]] = vector
        return torch.stack([cache[key] for key in keys]).to(self.device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# --- cached negatives --------------------------------------------------------------------------------


def append_rows(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack two tokenised batches ``(n1, L1)`` and ``(n2, L2)`` into ``(n1 + n2, max L)``.

    Rows are right-padded with 0 (no attention, no token), so each row encodes as it did alone; a key only
    one batch has (``token_type_ids``) is all zero in the other, which is what the encoder assumes without it.
    """
    width = max(first["input_ids"].size(1), second["input_ids"].size(1))

    def column(batch: dict[str, Tensor], name: str) -> Tensor:
        value = batch.get(name)
        if value is None:
            value = torch.zeros_like(batch["input_ids"])
        return torch.nn.functional.pad(value, (0, width - value.size(1)))

    return {name: torch.cat([column(first, name), column(second, name)]) for name in {**first, **second}}


class NegativeCacheStep:
    """A training step with cached negatives (Lindgren et al. 2021, :mod:`ragkit.retriever.negative_cache`).

    Besides the global batch, every query competes against a cache of passages encoded in earlier steps.
    One cached passage per query is drawn from the softmax over its stale scores and re-encoded with
    gradient, so the gradient equals that of the cross-entropy over batch + cache in expectation; the drawn
    passages get their fresh embeddings back, and the batch's passages enter the cache. Each process holds
    one shard of the cache; the draw is exact over the union of the shards. The logged loss is the
    cross-entropy over batch + cache (with the cache's stale scores). The in-batch candidates follow
    ``directions`` (DPR or GTE); the cache joins the query->passage pool.

    Per query, the cache entries that are its positives or its known answer-bearing passages
    (``batch.answer_rows``), and every passage of the global batch, are masked before the draw; the draw's
    logsumexp, which is the cache's share of the partition in the loss, is taken over the same allowed
    entries, so the draw and the partition cannot disagree. After each call :attr:`stats` holds the step's
    ``cache_size`` (entries over all shards when the draw was made) and ``cache_staleness`` (relative
    distance of the drawn items' cached embeddings to their re-encoding, over the global batch; None when
    no item was drawn).

    With ``chunk_size > 0`` the step runs through the gradient cache: the queries are encoded first (the
    draw needs them), the drawn items are appended to the batch's passages as extra rows, and all those rows
    are encoded chunk by chunk; the loss function splits them back into batch and drawn passages. Both
    paths call the same :meth:`loss` on the same rows, so they optimise the same estimator.
    """

    def __init__(self, model: nn.Module, capacity: int, dim: int, passage_max_length: int, temperature: float,
                 similarity: str, device: torch.device, seed: int, rank: int,
                 autocast_dtype: torch.dtype | None, scaler: "torch.amp.GradScaler | None",
                 directions: tuple[str, ...] = ("query_to_passage",), chunk_size: int = 0) -> None:
        self.model = model
        self.cache = NegativeCache(capacity, dim, passage_max_length, device=device)
        self.temperature = temperature
        self.similarity = similarity
        self.directions = directions
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.grad_cache = GradCache(model, self.loss, chunk_size, chunk_size, autocast_dtype, scaler) if chunk_size else None
        # Each process draws within its shard with its own noise; the choice of shard uses noise every
        # process shares (and no process uses for anything else), so all ranks pick the same shard.
        self.generator = torch.Generator(device=device).manual_seed(seed * 7919 + 1 + rank)
        self.shard_generator = torch.Generator(device=device).manual_seed(seed * 7919)
        self.stats: dict[str, float | int | None] = {}

    def __call__(self, batch: Batch, query_inputs: dict[str, Tensor], passage_inputs: dict[str, Tensor]) -> Tensor:
        """Forward and backward of one step on this process's share of the batch; returns the detached loss."""
        self.stats = {"cache_size": int(gather_no_grad(torch.tensor([len(self.cache)], device=self.device)).sum())}
        if self.grad_cache is not None:
            return self._cached_step(batch, query_inputs, passage_inputs)
        query = self._encode(query_inputs, "query")  # (b, D)
        passage = self._encode(passage_inputs, "passage")  # (b * G, D)
        draw = self.draw(batch, query)
        drawn = self._encode({k: v.to(self.device) for k, v in draw.inputs().items()}, "passage")  # (b * S, D)
        loss = self.loss(query, torch.cat([passage, drawn]), cache_lse=draw.lse, valid=draw.valid,
                         batch_rows=passage.size(0))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._update_cache(batch, draw, passage_inputs, passage.detach(), drawn.detach())
        return loss.detach()

    def _cached_step(self, batch: Batch, query_inputs: dict[str, Tensor], passage_inputs: dict[str, Tensor]) -> Tensor:
        grad_cache = self.grad_cache
        with grad_cache.step_region(query_inputs):
            query_chunks = split_inputs(query_inputs, grad_cache.query_chunk_size)
            query, query_first = grad_cache.forward_first(query_chunks, "query")  # (b, D)
            with torch.autocast(device_type=query.device.type, enabled=False):  # sampling in float32
                draw = self.draw(batch, query)
            rows = append_rows(passage_inputs, {k: v.to(self.device) for k, v in draw.inputs().items()})
            passage_chunks = split_inputs(rows, grad_cache.passage_chunk_size)
            passage, passage_first = grad_cache.forward_first(passage_chunks, "passage")  # (b * G + b * S, D)
            batch_rows = passage_inputs["input_ids"].size(0)
            loss, query_grad, passage_grad = grad_cache.build_cache(query, passage, cache_lse=draw.lse, valid=draw.valid,
                                                                    batch_rows=batch_rows)
            grad_cache.forward_backward(grad_cache.chunks(query_chunks, "query", query_first, query_grad),
                                        grad_cache.chunks(passage_chunks, "passage", passage_first, passage_grad))
        # The replayed forwards drew the same dropout masks, so these are the embeddings the loss saw.
        self._update_cache(batch, draw, passage_inputs, passage[:batch_rows], passage[batch_rows:])
        return loss

    def draw(self, batch: Batch, query: Tensor) -> CacheDraw:
        """One cached item per local query, exact over every process's shard; never one of the query's
        positives or known answer-bearing passages, nor a passage of the global batch."""
        excluded = batch.positive_rows
        if batch.answer_rows:
            excluded = [positives + answers for positives, answers in zip(batch.positive_rows, batch.answer_rows)]
        return distributed_draw(
            self.cache, query.detach(), generator=self.generator, shard_generator=self.shard_generator,
            temperature=self.temperature, similarity=self.similarity,
            excluded_ids=excluded, batch_ids=batch.passage_rows,
        )

    def loss(self, query: Tensor, rows: Tensor, *, cache_lse: Tensor, valid: Tensor, batch_rows: int) -> Tensor:
        """The cache estimator over the global batch from this process's rows: ``query`` ``(b, D)``; ``rows``
        ``(b * G + b * S, D)``, the batch's passages then the drawn items. Gathers everything across processes."""
        passage, drawn = rows[:batch_rows], rows[batch_rows:]  # (b * G, D), (b * S, D)
        out = cache_loss(
            gather_with_grad(query), gather_with_grad(passage), gather_with_grad(drawn),
            gather_no_grad(cache_lse), gather_no_grad(valid),
            temperature=self.temperature, similarity=self.similarity, directions=self.directions,
        )
        return out.loss

    def _update_cache(self, batch: Batch, draw: CacheDraw, passage_inputs: dict[str, Tensor], passage: Tensor,
                      drawn: Tensor) -> None:
        # Measured over the global batch so every process logs the same number.
        stale = staleness(gather_no_grad(draw.cached.flatten(0, 1)), gather_no_grad(drawn),
                          gather_no_grad(draw.valid.flatten()))
        self.stats["cache_staleness"] = None if bool(stale.isnan()) else float(stale)
        refresh_drawn(self.cache, draw, drawn)
        rows = torch.tensor(batch.passage_rows, dtype=torch.long)
        self.cache.add(passage, rows, passage_inputs["input_ids"], passage_inputs["attention_mask"],
                       passage_inputs.get("token_type_ids"))

    def _encode(self, inputs: dict[str, Tensor], tower: str) -> Tensor:
        with _autocast(self.device, self.autocast_dtype):
            return self.model(**inputs, tower=tower).float()  # (n, D)

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache.state_dict(), "generator": self.generator.get_state(),
                "shard_generator": self.shard_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state["cache"])
        self.generator.set_state(state["generator"])
        self.shard_generator.set_state(state["shard_generator"])


# --- evaluation --------------------------------------------------------------------------------------


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
        # Encoding passages of similar length together wastes less compute on padding.
        self.order = sorted(range(len(rows)), key=lambda i: len(self.texts[i]) + len(self.titles[i]))

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
        names = self.metric_names()
        return next((name for name in ("accuracy@20", "ndcg@10", "recall@20") if name in names), "accuracy@20")

    def metric_names(self) -> list[str]:
        """The metrics these questions can be scored by (answers, gold passages, judged documents)."""
        names = []
        if any(q["answers"] for q in self.questions):
            names += [f"accuracy@{k}" for k in DEFAULT_KS]
        if any(q["positive_ids"] for q in self.questions):
            names += [f"recall@{k}" for k in DEFAULT_KS] + ["mrr@10"]
        if any(grade > 0 for q in self.questions for grade in q["doc_scores"]):
            names += ["ndcg@10", "doc_recall@100"]
        return names

    @torch.inference_mode()
    def evaluate(self, model: BiEncoder, tokenizer: Any, device: torch.device, autocast_dtype: torch.dtype | None,
                 batch_size: int, query_max_length: int, passage_max_length: int, similarity: str = "dot") -> dict[str, Any]:
        """Retrieval metrics of ``model`` ranking the passages for every dev question by ``similarity``."""
        was_training = model.training
        model.eval()
        passage_vectors = torch.empty(len(self.passage_ids), model.embedding_dim)  # (P, D)
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start : start + batch_size]
            inputs = tokenize_passages(tokenizer, [self.titles[i] for i in idx], [self.texts[i] for i in idx], passage_max_length)
            passage_vectors[idx] = self._encode(model, inputs, "passage", device, autocast_dtype)
        ranked: list[list[int]] = []
        depth = min(EVAL_DEPTH, len(self.passage_ids))
        if similarity == "cos":
            passage_vectors = torch.nn.functional.normalize(passage_vectors, dim=-1)
        passage_vectors = passage_vectors.to(device)
        for start in range(0, len(self.questions), batch_size):
            texts = [q["question"] for q in self.questions[start : start + batch_size]]
            query_vectors = self._encode(model, tokenize_queries(tokenizer, texts, query_max_length), "query", device, autocast_dtype)
            if similarity == "cos":
                query_vectors = torch.nn.functional.normalize(query_vectors, dim=-1)
            top = (query_vectors.to(device) @ passage_vectors.T).topk(depth, dim=1)  # (b, depth)
            ranked += top.indices.tolist()
        model.train(was_training)
        rankings = [[self.passage_ids[i] for i in row] for row in ranked]
        position = {pid: i for i, pid in enumerate(self.passage_ids)}
        metrics = retrieval_metrics(
            self.questions, rankings,
            passage_text=lambda pid: self.texts[position[pid]],
            passage_doc=(lambda pid: self.doc_ids[position[pid]]) if self.judged else None,
            ks=DEFAULT_KS, match_type=self.match_type,
        )
        metrics["passages_searched"] = len(self.passage_ids)
        return metrics

    @staticmethod
    def _encode(model: BiEncoder, inputs: dict[str, Tensor], tower: str, device: torch.device,
                autocast_dtype: torch.dtype | None) -> Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with _autocast(device, autocast_dtype):
            return model(**inputs, tower=tower).float().cpu()  # (b, D)


# --- the trainer -------------------------------------------------------------------------------------


class Trainer:
    """Builds the model, data, optimiser and loss from a config; :meth:`train` runs the whole stage."""

    def __init__(self, cfg: TrainRetrieverConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = resolve_device(cfg.device, dist_info)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise RagkitError(f"precision=fp16 needs a CUDA device, this run is on {self.device.type} (use --precision bf16 or fp32)")
        self.autocast_dtype = AUTOCAST_DTYPES[cfg.precision]
        self.out = Path(cfg.out)
        self.work = work_dir_for(self.out)
        self._check_output()

        self.mine_dir = Path(cfg.mine)
        self.mine = read_upstream(self.mine_dir, "mine")
        self.ingest_dir = self.mine.upstream("ingest")
        read_upstream(self.ingest_dir, "ingest")
        self.passages = PassageLookup.open(self.ingest_dir)
        train_dir = self.mine_dir / "examples" / "train"
        if not train_dir.is_dir():
            raise RagkitError(f"{self.mine_dir}: has no examples/train split (mine the ingest artifact's train questions)")
        import datasets

        self.examples = RetrievalExamples(datasets.load_from_disk(str(train_dir)), self.passages, cfg.hard_negatives, cfg.seed)
        self.sampler = ResumableBatchSampler(len(self.examples), cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.batches_per_epoch()
        self.dev = self._dev_evaluation() if dist_info.is_main else None
        self.select_metric = cfg.select_metric
        if self.dev is not None and self.select_metric == "auto":
            self.select_metric = self.dev.default_metric
        if self.dev is not None and self.select_metric not in self.dev.metric_names():
            raise RagkitError(
                f"select_metric={self.select_metric!r} cannot be computed on the dev questions "
                f"(available: {', '.join(self.dev.metric_names()) or 'none'}; pass one of them)"
            )

    def _check_output(self) -> None:
        cfg = self.cfg
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not cfg.overwrite:
            raise RagkitError(f"{self.out}: output directory exists and is not empty (pass --overwrite to replace it)")
        if self.work.exists() and not cfg.resume and not cfg.overwrite:
            raise RagkitError(f"{self.work}: holds an interrupted training run (pass --resume to continue it, or --overwrite to start over)")
        # Every process checks before the first one starts creating the work directory.
        barrier()

    def _dev_evaluation(self) -> DevEvaluation | None:
        import datasets

        for path in (self.ingest_dir / "questions" / "dev", self.mine_dir / "examples" / "dev"):
            if path.is_dir():
                questions = datasets.load_from_disk(str(path))
                if len(questions) == 0:
                    continue
                match_type = str(self.mine.config.get("match_type", "string"))
                dev = DevEvaluation(questions, self.passages, self.mine_dir / "runs" / "dev.trec",
                                    self.cfg.eval_max_passages, self.cfg.seed, match_type)
                # Questions with neither answers, gold passages nor judged documents cannot be scored.
                return dev if dev.metric_names() else None
        return None

    # --- building --------------------------------------------------------------------------------------

    def _build(self, start_from: str, passage_model: str | None) -> None:
        cfg = self.cfg
        self.model = BiEncoder.from_pretrained(start_from, shared=cfg.shared, pooling=cfg.pooling, normalize=cfg.normalize,
                                               passage_model=passage_model)
        self.model.to(self.device)
        self.tokenizer = load_tokenizer(cfg.model, cfg.passage_model)
        self.spec = RetrieverSpec(
            shared=self.model.shared, pooling=self.model.pooling, normalize=self.model.normalize,
            similarity=cfg.similarity, temperature=cfg.temperature,
            query_max_length=cfg.query_max_length, passage_max_length=cfg.passage_max_length,
        )
        self.collate = BatchCollator(self.tokenizer, self.passages, cfg.query_max_length, cfg.passage_max_length)
        self.trained = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        warmup = warmup_steps_for(cfg.warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(warmup_linear_decay, warmup_steps=warmup, total_steps=self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.loss = ContrastiveLoss(
            temperature=cfg.temperature, similarity=cfg.similarity, directions=LOSS_DIRECTIONS[cfg.loss],
            guide_margin_strategy=cfg.guide_margin_strategy if cfg.guide else None,
            guide_margin=cfg.guide_margin if cfg.guide else 0.0,
        )
        loss_fn = global_loss(self.loss)
        if cfg.chunk_size:
            self.step_fn = GradCache(self.trained, loss_fn, cfg.chunk_size, cfg.chunk_size, self.autocast_dtype, self.scaler)
        else:
            self.step_fn = functools.partial(full_batch_step, self.trained, loss_fn,
                                             autocast_dtype=self.autocast_dtype, scaler=self.scaler)
        self.negatives = None
        if cfg.negative_cache:
            self.negatives = NegativeCacheStep(
                self.trained, cfg.negative_cache, self.model.embedding_dim, cfg.passage_max_length, cfg.temperature,
                cfg.similarity, self.device, cfg.seed, self.dist.rank, self.autocast_dtype, self.scaler,
                directions=LOSS_DIRECTIONS[cfg.loss], chunk_size=cfg.chunk_size,
            )
        self.guide = None
        if cfg.guide:
            self.guide = GuideEncoder(cfg.guide, self.device, cfg.chunk_size or cfg.eval_batch_size, cfg.query_max_length,
                                      cfg.passage_max_length, self.autocast_dtype)

    # --- the loop --------------------------------------------------------------------------------------

    def train(self, on_step: Callable[[int], None] | None = None) -> Manifest:
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)
        checkpoint = latest_checkpoint(self.work) if cfg.resume else None
        # A checkpoint holds both towers; the starting passage model only matters for a fresh start.
        start = (str(checkpoint / "model"), None) if checkpoint else (cfg.model, cfg.passage_model)
        self._build(*start)
        if checkpoint is not None:
            state = self._restore(checkpoint)
        else:
            state = TrainState()
            self._fresh_work_dir()
        log = open(self.work / METRICS_FILE, "a", encoding="utf-8") if self.dist.is_main else None
        try:
            self._loop(state, log, on_step)
        finally:
            if log is not None:
                log.close()
        barrier()
        manifest = self._write_artifact(state) if self.dist.is_main else None
        barrier()
        return manifest if manifest is not None else Manifest.load(self.out)

    def _loop(self, state: TrainState, log, on_step: Callable[[int], None] | None) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        per_epoch = self.sampler.batches_per_epoch()
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train retriever", unit="step",
                   disable=not self.dist.is_main, dynamic_ncols=True)
        trained_seconds, trained_examples = 0.0, 0
        if self.dev is not None and cfg.eval_every and state.step == 0:
            # The starting model's score, to tell whether training helps; it is not a candidate to keep.
            state.start_metrics = self._evaluate(state, log, bar, keep_best=False)
        while state.step < self.total_steps:
            for batch in self._batches(state):
                started = time.perf_counter()
                loss, grad_norm, lr = self._step(batch)
                trained_seconds += time.perf_counter() - started
                trained_examples += cfg.batch_size
                state.step += 1
                state.batch_in_epoch += 1
                state.examples_seen += cfg.batch_size
                if state.batch_in_epoch == per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                speed = trained_examples / trained_seconds
                cache_stats = self.negatives.stats if self.negatives is not None else {}
                self._log(log, {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                                "grad_norm": grad_norm, "examples_per_s": round(speed, 2), **cache_stats})
                postfix = {"loss": f"{loss:.4f}", "ex_s": f"{speed:.1f}"}
                if cache_stats.get("cache_staleness") is not None:
                    postfix["stale"] = f"{cache_stats['cache_staleness']:.3f}"
                bar.set_postfix(**postfix)
                bar.update(1)
                last = state.step == self.total_steps
                if self.dev is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    self._evaluate(state, log, bar)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not last:
                    self._save_checkpoint(state)
                if on_step is not None:
                    on_step(state.step)
                if last:
                    break
        bar.close()

    def _batches(self, state: TrainState) -> Iterator[Batch]:
        self.examples.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
        for indices in self.sampler:
            yield self.collate([self.examples[i] for i in indices])

    def _step(self, batch: Batch) -> tuple[float, float | None, float]:
        """One optimiser step on this process's share of a global batch: (loss, gradient norm, learning rate)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        query = {k: v.to(self.device) for k, v in batch.query.items()}  # (b, Lq)
        passage = {k: v.to(self.device) for k, v in batch.passage.items()}  # (b * G, Lp)
        if self.negatives is not None:
            loss = self.negatives(batch, query, passage)
        else:
            guide = self.guide(batch) if self.guide is not None else {}
            loss = self.step_fn(query, passage, **guide)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        lr = self.optimizer.param_groups[0]["lr"]
        if self.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return float(loss), grad_norm, lr

    def _evaluate(self, state: TrainState, log, bar, keep_best: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        metrics = self.dev.evaluate(self.model, self.tokenizer, self.device, self.autocast_dtype, cfg.eval_batch_size,
                                    cfg.query_max_length, cfg.passage_max_length, cfg.similarity)
        value = float(metrics[self.select_metric])
        self._log(log, {"step": state.step, "split": "dev", **metrics})
        message = f"step {state.step}: dev {self.select_metric} = {value:.4f}"
        bar.write(message)
        if keep_best and (state.best_metric is None or value > state.best_metric):
            state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
            self._save_model(self.work / BEST)
        return metrics

    def _log(self, log, record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    # --- work directory and checkpoints ----------------------------------------------------------------

    def _fresh_work_dir(self) -> None:
        """An empty work directory, created once everything is built (a bad setting leaves nothing behind)."""
        if self.dist.is_main:
            shutil.rmtree(self.work, ignore_errors=True)
            (self.work / CHECKPOINTS).mkdir(parents=True)
        barrier()

    def _save_model(self, target: Path) -> None:
        """Write the model to ``target`` through a temporary sibling (first process only)."""
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging, self.tokenizer, self.spec)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def _save_checkpoint(self, state: TrainState) -> None:
        """Write ``checkpoints/step-K`` (every process adds its random state), then drop older ones."""
        root = self.work / CHECKPOINTS
        staging = root / f"step-{state.step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            self.model.save_pretrained(staging / "model", self.tokenizer, self.spec)
            torch.save(
                {
                    "state": dataclasses.asdict(state),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "config": as_dict(self.cfg),
                    "mine_manifest_sha256": hash_file(self.mine_dir / "manifest.json"),
                    "world_size": self.dist.world_size,
                },
                staging / STATE_FILE,
            )
        barrier()
        torch.save(rng_state(), staging / f"rng-rank{self.dist.rank}.pt")
        if self.negatives is not None:
            torch.save(self.negatives.state_dict(), staging / f"negative-cache-rank{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            staging.rename(root / f"step-{state.step}")
            for old in root.glob("step-*"):
                if old.name != f"step-{state.step}":
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _restore(self, checkpoint: Path) -> TrainState:
        """Load optimiser, schedule, scaler, random state and data position (the weights are already loaded)."""
        saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        current = as_dict(self.cfg)
        changed = [k for k in current if k not in RESUMABLE_CHANGES and saved["config"].get(k) != current[k]]
        if changed:
            name = changed[0]
            raise RagkitError(
                f"{checkpoint}: was trained with {name}={saved['config'].get(name)!r}, now {name}={current[name]!r} "
                f"(resume with the same settings, or pass --overwrite to start over)"
            )
        if saved["mine_manifest_sha256"] != hash_file(self.mine_dir / "manifest.json"):
            raise RagkitError(f"{checkpoint}: the mine artifact {self.mine_dir} was rebuilt since (pass --overwrite to start over)")
        if saved["world_size"] != self.dist.world_size:
            raise RagkitError(
                f"{checkpoint}: was written by {saved['world_size']} processes, this run has {self.dist.world_size} "
                f"(resume with the same number of processes)"
            )
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(torch.load(checkpoint / f"rng-rank{self.dist.rank}.pt", map_location="cpu", weights_only=True))
        if self.negatives is not None:
            self.negatives.load_state_dict(
                torch.load(checkpoint / f"negative-cache-rank{self.dist.rank}.pt", map_location="cpu", weights_only=True)
            )
        state = TrainState(**saved["state"])
        if self.dist.is_main:
            _truncate_log(self.work / METRICS_FILE, state.step)
            print(f"resuming from {checkpoint} (step {state.step} of {self.total_steps})")
        return state

    # --- the artifact ----------------------------------------------------------------------------------

    def _write_artifact(self, state: TrainState) -> Manifest:
        cfg = self.cfg
        bm25_dev = self.mine.metrics.get("dev", {}) if isinstance(self.mine.metrics, dict) else {}
        counts: dict[str, Any] = {
            "steps": state.step,
            "examples_seen": state.examples_seen,
            "epochs": round(state.step / self.sampler.batches_per_epoch(), 3),
            "train_examples": len(self.examples),
            "train_examples_without_positive": self.examples.skipped,
            "processes": self.dist.world_size,
        }
        metrics: dict[str, Any] = {}
        if self.dev is not None:
            counts["dev_questions"] = len(self.dev.questions)
            counts["dev_passages_searched"] = len(self.dev.passage_ids)
            metrics = {"select_metric": self.select_metric, "best_step": state.best_step, "dev": state.best_metrics,
                       "dev_start": state.start_metrics,
                       "bm25_dev": bm25_dev, "dev_passage_subset": self.dev.subset}
        with staged_output(self.out, cfg.overwrite) as tmp:
            if state.best_step is not None:
                for item in (self.work / BEST).iterdir():
                    shutil.move(str(item), tmp / item.name)
            else:
                self.model.save_pretrained(tmp, self.tokenizer, self.spec)
            shutil.move(str(self.work / METRICS_FILE), tmp / METRICS_FILE)
            manifest = Manifest(
                stage=STAGE,
                config=as_dict(cfg),
                inputs=[artifact_input(self.mine_dir, self.mine)],
                counts=counts,
                metrics=metrics,
                files={"query_encoder": "query_encoder", "passage_encoder": "passage_encoder",
                       "spec": "retriever.json", "log": METRICS_FILE},
            )
            manifest.save(tmp)
        shutil.rmtree(self.work, ignore_errors=True)
        manifest.path = self.out
        return manifest


def latest_checkpoint(work: Path) -> Path | None:
    """The complete ``checkpoints/step-K`` with the largest K, if any."""
    found = []
    for path in (work / CHECKPOINTS).glob("step-*"):
        suffix = path.name[len("step-"):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step``: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
