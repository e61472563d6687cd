"""``ragkit train retriever``: fine-tune a dual encoder on the examples of a mine artifact.

One training step: the sampler hands this process its share of a global batch of questions, each with
one positive and ``N`` hard negatives (:mod:`ragkit.retriever.data`); the towers encode them; the
representations of every process are gathered and one :class:`ContrastiveLoss` scores every question
against every passage of the global batch. The same loss object serves the plain step and the gradient
cache (``chunk_size > 0``), so temperature, similarity and guide masking cannot differ between the two.
AdamW (no weight decay on biases and normalisation weights), linear warm-up then linear decay, gradient
clipping (after unscaling under fp16), bf16/fp16 autocast.

By default (``mask_known_positives``) every passage labelled relevant to a question (its positives, the
passages mining found to contain its answer) leaves that question's in-batch pool: SQuAD-style data asks
several questions of one paragraph, so another question's positive is often this one's too
(:func:`~ragkit.retriever.losses.labelled_false_negatives`; the rows are gathered like the
representations). Two more options change what the loss sees. A guide model (GISTEmbed, ``guide``,
:mod:`ragkit.retriever.guide`) is frozen; its embeddings of the batch's questions and passages are
computed without gradient, cached per question id and passage for the whole run, and passed to the
loss, which drops in-batch candidates the guide rates above the positive. A negative cache
(``negative_cache``) adds passages of earlier steps to every question's softmax through the sampled
estimator of :mod:`ragkit.retriever.negative_cache` (the step itself is
:class:`~ragkit.retriever.negative_cache.step.NegativeCacheStep`). That estimator keeps the in-batch
partition of the chosen loss (DPR or GTE) and runs on the plain step or the gradient cache; it does not
combine with a guide, which would have to score every cached passage to mask the cache's softmax. A
question's positives and the passages mining found to contain its answer are kept out of its cache
softmax (the draw and the partition alike). Mining only checks the passages BM25 retrieved for it (its
top ``depth``): an answer-bearing passage BM25 missed is not known, so it is not masked and can still
act as a false negative from the cache. Each step's log record adds ``cache_size`` (passages the step's
queries competed against) and ``cache_staleness``
(:func:`~ragkit.retriever.negative_cache.estimator.staleness` of the drawn items' cached embeddings
against their re-encoding; null while nothing could be drawn).

Runs survive a crash. Everything in progress lives in a work directory next to the output,
``<out parent>/.<out name>.work/``: the per-step log ``metrics.jsonl``, the best model so far and the
checkpoints ``--resume`` continues from (:mod:`ragkit.retriever.checkpoints`). When training ends, the
kept model, the log and the manifest are moved into ``<out>`` in one rename and the work directory is
removed.

The dev questions are evaluated every ``eval_every`` steps and at the end
(:mod:`ragkit.retriever.dev_evaluation`); the model with the best ``select_metric`` is the one kept.

Under ``torchrun`` every process trains; logging, evaluation, checkpoints and the artifact are the
first process's work.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..artifacts import Manifest, artifact_input, read_upstream, staged_output, work_dir_for
from ..config import TrainRetrieverConfig, as_dict
from ..errors import RagkitError
from ..evaluation import PassageLookup
from ..indexing.encode import resolve_device, resolve_precision
from .checkpoints import CHECKPOINTS, TrainState, latest_checkpoint, restore_checkpoint, save_checkpoint, truncate_log
from .data import Batch, BatchCollator, ResumableBatchSampler, RetrievalExamples
from .dev_evaluation import DevEvaluation
from .distributed import DistInfo, barrier, cleanup_distributed, global_loss, init_distributed, is_distributed
from .encoder import BiEncoder, RetrieverSpec, load_tokenizer
from .gradcache import GradCache, full_batch_step
from .guide import GuideEncoder
from .losses import DIRECTIONS, ContrastiveLoss
from .negative_cache.step import NegativeCacheStep

STAGE = "train-retriever"
EVAL_SPLITS = ("validation", "dev")
"""Question splits evaluated during training, the first present chosen: it selects the kept model."""
METRICS_FILE = "metrics.jsonl"
BEST = "best"
LOSS_DIRECTIONS = {"dpr": ("query_to_passage",), "gte": DIRECTIONS}


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


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, parameters: Any,
                   max_grad_norm: float) -> tuple[float | None, float]:
    """After ``backward``: unscale (fp16), clip to ``max_grad_norm`` (0: no clipping), step the optimiser,
    the scaler and the schedule. Returns the gradient norm before clipping and the learning rate used."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)) if max_grad_norm else None
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return grad_norm, lr


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    return int(round(warmup * total_steps)) if warmup < 1 else min(int(warmup), total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



# --- the trainer -------------------------------------------------------------------------------------


class Trainer:
    """Builds the model, data, optimiser and loss from a config; :meth:`train` runs the whole stage."""

    def __init__(self, cfg: TrainRetrieverConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = resolve_device(cfg.device, dist_info)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
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

        self.examples = RetrievalExamples(datasets.load_from_disk(str(train_dir)), self.passages, cfg.hard_negatives, cfg.seed,
                                          cfg.negative_offset)
        self.known_width = self.examples.max_known()
        self.sampler = ResumableBatchSampler(len(self.examples), cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.batches_per_epoch()
        self.eval_split = EVAL_SPLITS[-1]
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

        # A validation split (``ragkit ingest --validation-fraction``) chooses the kept model when there is
        # one, so the dev split stays unseen by every choice and can be reported.
        for split in EVAL_SPLITS:
            for path in (self.ingest_dir / "questions" / split, self.mine_dir / "examples" / split):
                if not path.is_dir():
                    continue
                questions = datasets.load_from_disk(str(path))
                if len(questions) == 0:
                    continue
                match_type = str(self.mine.config.get("match_type", "string"))
                dev = DevEvaluation(questions, self.passages, self.mine_dir / "runs" / f"{split}.trec",
                                    self.cfg.eval_max_passages, self.cfg.seed, match_type)
                self.eval_split = split
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
            state = restore_checkpoint(self, checkpoint)
            if self.dist.is_main:
                truncate_log(self.work / METRICS_FILE, state.step)
                print(f"resuming from {checkpoint} (step {state.step} of {self.total_steps})")
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
                    save_checkpoint(self, state)
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
        labels = batch.labels(self.known_width, self.device) if self.cfg.mask_known_positives else {}
        if self.negatives is not None:
            loss = self.negatives(batch, query, passage, **labels)
        else:
            guide = self.guide(batch) if self.guide is not None else {}
            loss = self.step_fn(query, passage, **guide, **labels)
        grad_norm, lr = optimizer_step(self.optimizer, self.scheduler, self.scaler, self.model.parameters(), self.cfg.max_grad_norm)
        return float(loss), grad_norm, lr

    def _evaluate(self, state: TrainState, log, bar, keep_best: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        metrics = self.dev.evaluate(self.model, self.tokenizer, self.autocast_dtype, cfg.eval_batch_size,
                                    cfg.query_max_length, cfg.passage_max_length, cfg.similarity)
        value = float(metrics[self.select_metric])
        self._log(log, {"step": state.step, "split": self.eval_split, **metrics})
        message = f"step {state.step}: {self.eval_split} {self.select_metric} = {value:.4f}"
        bar.write(message)
        if keep_best and (state.best_metric is None or value > state.best_metric):
            state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
            self._save_model(self.work / BEST)
        return metrics

    def _log(self, log, record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    # --- work directory -------------------------------------------------------------------------------

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

    # --- the artifact ----------------------------------------------------------------------------------

    def _write_artifact(self, state: TrainState) -> Manifest:
        cfg = self.cfg
        split = self.eval_split
        bm25_dev = self.mine.metrics.get(split, {}) if isinstance(self.mine.metrics, dict) else {}
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
            counts[f"{split}_questions"] = len(self.dev.questions)
            counts[f"{split}_passages_searched"] = len(self.dev.passage_ids)
            metrics = {"select_metric": self.select_metric, "eval_split": split, "best_step": state.best_step,
                       split: state.best_metrics, f"{split}_start": state.start_metrics,
                       f"bm25_{split}": bm25_dev, f"{split}_passage_subset": self.dev.subset}
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
