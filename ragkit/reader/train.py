"""``ragkit train reader``: fine-tune a RAG reader (generator + query tower) over a fixed index.

Each step takes ``batch_size`` questions of the training split, retrieves ``n_docs`` passages for each
with the query tower as it is now, and minimises the RAG-Sequence or RAG-Token loss of the question's
first answer (:meth:`ragkit.reader.rag.RagReader.loss`); AdamW with linear warm-up and decay, gradient
clipping, bf16 / fp16 autocast where the hardware has it. The passage vectors never change: only the
prior ``log_softmax(q.d)`` carries gradient into the query tower (none with ``--freeze-query-encoder``).

* **Evaluation** answers a fixed, seeded sample of the evaluation split (``validation`` when the ingest
  artifact has it, else ``dev``) before training and every ``eval_every`` steps, reporting EM / F1 (SQuAD
  normalisation) and retrieval recall (an answer string among the passages read); the best checkpoint
  by EM, then F1, is kept. The starting reader's scores are reported beside it but are not a candidate.
* **Recall watch**: retrieval recall is averaged over the last ``recall_window`` training batches; if it
  falls below half of the first window's, a warning says so once. A query tower that drifts away from
  the fixed passage vectors is a known failure of RAG fine-tuning (Lewis et al. froze the document
  encoder for that reason; a collapsing query tower then reads useless passages).
* **Checkpoints** (``checkpoint_every``) hold the reader, the optimiser, schedule, gradient scaler,
  random state and data position in ``<out>.work/checkpoints/step-K``; ``--resume`` continues from the
  latest and ends with the weights an uninterrupted run would have.

The artifact (stage ``train-reader``) is a reader directory (:mod:`ragkit.reader.rag`) plus
``metrics.jsonl``, the per-step log.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..artifacts import Manifest, artifact_input, hash_file, read_upstream, staged_output, work_dir_for
from ..config import as_dict
from ..errors import RagkitError
from ..evaluation import find_ingest, load_questions
from ..indexing.versions import IndexVersion
from ..retriever.checkpoints import check_same_settings, latest_checkpoint, rng_state, set_rng_state, truncate_log
from ..retriever.trainer import optimizer_step, parameter_groups, seed_everything, warmup_linear_decay, warmup_steps_for
from .answer import answer_questions, sample_rows
from .config import TrainReaderConfig
from .rag import RagReader, retrieval_recall

STAGE = "train-reader"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
MODEL_DIR = "model"
BEST = "best"
EVAL_SPLITS = ("validation", "dev")


@dataclasses.dataclass
class ReaderTrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: list[float] | None = None
    """(EM, F1) of the kept checkpoint."""
    best_step: int | None = None
    best_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    start_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    recall_history: list[float] = dataclasses.field(default_factory=list)
    """Retrieval recall of the latest training batches."""
    recall_first_window: float | None = None
    """Mean recall of the first ``recall_window`` batches: what a collapse is measured against."""
    recall_warned: bool = False


def run(cfg: TrainReaderConfig, on_step: Callable[[int], None] | None = None) -> Manifest:
    """Train a reader over ``cfg.index``; ``on_step(step)`` runs after each step's evaluation and checkpoint."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return ReaderTrainer(cfg).train(on_step)


class ReaderTrainer:
    """Everything one ``train reader`` run needs, checked before any work starts."""

    def __init__(self, cfg: TrainReaderConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = work_dir_for(self.out)
        if self.out.exists() and not cfg.overwrite and not cfg.resume:
            raise RagkitError(f"{self.out}: already exists (pass --overwrite to replace it)")
        self.index_manifest = read_upstream(cfg.index, "index")
        self.index_encoder = IndexVersion.open(cfg.index).encoder
        ingest_dir = find_ingest(self.index_manifest)
        train = load_questions(ingest_dir, cfg.split)
        train = train.select(sample_rows(len(train), cfg.max_train_questions, cfg.seed))
        self.train_questions = train.filter(lambda row: len(row["answers"]) > 0)
        if len(self.train_questions) == 0:
            raise RagkitError(f"{ingest_dir}/questions/{cfg.split}: no question has an answer to train on (pick a split with answers)")
        self.eval_split = cfg.eval_split or next((s for s in EVAL_SPLITS if (ingest_dir / "questions" / s).is_dir()), None)
        self.eval_questions = None
        if self.eval_split is not None:
            questions = load_questions(ingest_dir, self.eval_split)
            self.eval_questions = questions.select(sample_rows(len(questions), cfg.eval_max_questions, cfg.seed))
        per_epoch = -(-len(self.train_questions) // cfg.batch_size)
        self.batches_per_epoch = per_epoch
        self.total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * per_epoch)))

    def _build(self, start: str) -> None:
        cfg = self.cfg
        kwargs = {"query_model": cfg.query_model} if not (Path(start) / "reader.json").is_file() else {}
        self.reader = RagReader.load(start, index=cfg.index, device=cfg.device, precision=cfg.precision, marginal=cfg.marginal,
                                     max_input_length=cfg.max_input_length, temperature=cfg.temperature, training=True,
                                     **kwargs)
        self.retriever = self.reader.retriever(cfg.index, mode=cfg.retrieval, mine=cfg.bm25, alpha=cfg.alpha,
                                               precision=cfg.precision)
        if cfg.n_docs > len(self.retriever):
            raise RagkitError(f"{cfg.index}: --n-docs {cfg.n_docs} is more than the {len(self.retriever)} passages it holds")
        if cfg.gradient_checkpointing:
            model = self.reader.generator.model
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder = self.reader.encoder
        encoder.requires_grad_(not cfg.freeze_query_encoder)
        trained = [self.reader.generator.model] + ([] if cfg.freeze_query_encoder else [encoder])
        groups = [g for module in trained for g in parameter_groups(module, cfg.weight_decay)]
        self.parameters = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        warmup = warmup_steps_for(cfg.warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_linear_decay(step, warmup, self.total_steps))
        fp16 = self.reader.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.reader.device.type) if fp16 else None

    # -- the run --------------------------------------------------------------------------------------

    def train(self, on_step: Callable[[int], None] | None = None) -> Manifest:
        cfg = self.cfg
        seed_everything(cfg.seed)
        checkpoint = latest_checkpoint(self.work) if cfg.resume else None
        self._build(str(checkpoint / MODEL_DIR) if checkpoint else cfg.generator)
        if checkpoint is not None:
            state = self._restore(checkpoint)
            truncate_log(self.work / METRICS_FILE, state.step)
            print(f"resuming from {checkpoint} (step {state.step} of {self.total_steps})")
        else:
            state = ReaderTrainState()
            shutil.rmtree(self.work, ignore_errors=True)
            (self.work / CHECKPOINTS).mkdir(parents=True)
        with open(self.work / METRICS_FILE, "a", encoding="utf-8") as log:
            self._loop(state, log, on_step)
        return self._write_artifact(state)

    def _loop(self, state: ReaderTrainState, log: Any, on_step: Callable[[int], None] | None) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train reader", unit="step", dynamic_ncols=True)
        if self.eval_questions is not None and state.step == 0 and not state.start_metrics:
            state.start_metrics = self._evaluate(state, log, bar, keep_best=False)
        while state.step < self.total_steps:
            order = np.random.default_rng([cfg.seed, state.epoch]).permutation(len(self.train_questions))
            for batch in range(state.batch_in_epoch, self.batches_per_epoch):
                rows = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size].tolist()
                started = time.perf_counter()
                loss, recall, lr, grad_norm = self._step(self.train_questions.select(rows))
                state.step += 1
                state.batch_in_epoch = batch + 1
                if state.batch_in_epoch == self.batches_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                self._watch_recall(state, recall, bar)
                record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "retrieval_recall": recall, "seconds": round(time.perf_counter() - started, 3)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", recall=f"{recall:.2f}")
                bar.update(1)
                last = state.step == self.total_steps
                if self.eval_questions is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    self._evaluate(state, log, bar)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not last:
                    self._save_checkpoint(state)
                if on_step is not None:
                    on_step(state.step)
                if last or state.batch_in_epoch == 0:
                    break
        bar.close()

    def _step(self, batch: Any) -> tuple[float, float, float, float | None]:
        cfg = self.cfg
        self.reader.generator.model.train()
        self.reader.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        answers = [golds[0] for golds in batch["answers"]]
        loss, found = self.reader.loss(batch["question"], answers, self.retriever, cfg.n_docs, cfg.label_smoothing)
        mean = loss / len(answers)
        (self.scaler.scale(mean) if self.scaler is not None else mean).backward()
        grad_norm, lr = optimizer_step(self.optimizer, self.scheduler, self.scaler, self.parameters, cfg.max_grad_norm)
        self.reader.generator.model.eval()
        self.reader.encoder.eval()
        return float(mean.detach()), retrieval_recall(found, batch["answers"]), lr, grad_norm

    def _watch_recall(self, state: ReaderTrainState, recall: float, bar: Any) -> None:
        window = self.cfg.recall_window
        state.recall_history = (state.recall_history + [recall])[-window:]
        if len(state.recall_history) < window:
            return
        now = float(np.mean(state.recall_history))
        if state.recall_first_window is None:
            state.recall_first_window = now
        first = state.recall_first_window
        if not state.recall_warned and now < 0.5 * first:
            state.recall_warned = True
            message = (f"step {state.step}: retrieval recall fell from {first:.2f} to {now:.2f} (means over {window} batches): "
                       f"the query tower is drifting from the fixed passage vectors (lower --lr or pass --freeze-query-encoder)")
            bar.write(f"warning: {message}")
            warnings.warn(message, stacklevel=2)

    def _evaluate(self, state: ReaderTrainState, log: Any, bar: Any, keep_best: bool = True) -> dict[str, Any]:
        from .decode import DecodingOptions

        _, metrics = answer_questions(self.reader, self.retriever, self.eval_questions, self.cfg.n_docs, self.cfg.decoding,
                                      options=DecodingOptions(max_new_tokens=self.cfg.max_new_tokens))
        log.write(json.dumps({"step": state.step, "split": self.eval_split, **metrics}) + "\n")
        log.flush()
        bar.write(f"step {state.step}: {self.eval_split} EM {100 * metrics.get('em', 0):.1f} F1 {100 * metrics.get('f1', 0):.1f} "
                  f"recall@{self.cfg.n_docs} {100 * metrics.get(f'recall@{self.cfg.n_docs}', 0):.1f}")
        score = [metrics.get("em", 0.0), metrics.get("f1", 0.0)]
        if keep_best and (state.best is None or score > state.best):
            state.best, state.best_step, state.best_metrics = score, state.step, metrics
            self._save_reader(self.work / BEST)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------------

    def _save_reader(self, target: Path) -> None:
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        self.reader.save(staging, self.index_encoder)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def _save_checkpoint(self, state: ReaderTrainState) -> None:
        root = self.work / CHECKPOINTS
        staging = root / f"step-{state.step}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.reader.save(staging / MODEL_DIR, self.index_encoder)
        torch.save({
            "state": dataclasses.asdict(state), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "config": as_dict(self.cfg), "index_manifest_sha256": hash_file(Path(self.cfg.index) / "manifest.json"),
            "rng": rng_state(),
        }, staging / STATE_FILE)
        staging.rename(root / f"step-{state.step}")
        for old in root.glob("step-*"):
            if old.name != f"step-{state.step}":
                shutil.rmtree(old, ignore_errors=True)

    def _restore(self, checkpoint: Path) -> ReaderTrainState:
        saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        current = as_dict(self.cfg)
        check_same_settings(checkpoint, saved["config"], current)
        if saved["index_manifest_sha256"] != hash_file(Path(self.cfg.index) / "manifest.json"):
            raise RagkitError(f"{checkpoint}: the index {self.cfg.index} was rebuilt since (pass --overwrite to start over)")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        return ReaderTrainState(**saved["state"])

    # -- the artifact ---------------------------------------------------------------------------------

    def _write_artifact(self, state: ReaderTrainState) -> Manifest:
        cfg = self.cfg
        counts = {"steps": state.step, "epochs": round(state.step / self.batches_per_epoch, 3),
                  "train_questions": len(self.train_questions),
                  "eval_questions": len(self.eval_questions) if self.eval_questions is not None else 0}
        metrics = {"eval_split": self.eval_split, "best_step": state.best_step, "select_metric": "em, then f1",
                   f"{self.eval_split}": state.best_metrics, f"{self.eval_split}_start": state.start_metrics}
        with staged_output(self.out, cfg.overwrite or cfg.resume) as tmp:
            if state.best_step is not None:
                for item in (self.work / BEST).iterdir():
                    shutil.move(str(item), tmp / item.name)
            else:
                self.reader.save(tmp, self.index_encoder)
            shutil.move(str(self.work / METRICS_FILE), tmp / METRICS_FILE)
            manifest = Manifest(
                stage=STAGE, config=as_dict(cfg), inputs=[artifact_input(cfg.index, self.index_manifest)],
                counts=counts, metrics=metrics,
                files={"reader": "reader.json", "generator": "generator", "query_encoder": "query_encoder", "log": METRICS_FILE},
            )
            manifest.save(tmp)
        shutil.rmtree(self.work, ignore_errors=True)
        manifest.path = self.out
        return manifest
