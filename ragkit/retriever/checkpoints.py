"""Checkpoints of a training run: what is saved, how a run resumes, and where the latest one is.

Runs survive a crash. Everything in progress lives in a work directory next to the output,
``<out parent>/.<out name>.work/``: the per-step log ``metrics.jsonl``, the best model so far and
``checkpoints/step-K/`` (model, optimiser, schedule, gradient scaler, every process's random state and
the data position, and the negative cache with its generators). ``--resume`` continues from the latest
checkpoint and ends with exactly the weights an uninterrupted run would have (with a guide, up to the
guide's embeddings, which are recomputed in batches padded differently and may differ in the last bit,
flipping a mask only at an exact tie).

Only settings in :data:`RESUMABLE_CHANGES` may differ between the interrupted run and its resumption; the
mine artifact and the number of processes must be the same.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..artifacts import hash_file
from ..config import as_dict
from ..errors import RagkitError
from .distributed import barrier

if TYPE_CHECKING:
    from .trainer import Trainer

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
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


def save_checkpoint(trainer: Trainer, state: TrainState) -> None:
    """Write ``checkpoints/step-K`` (every process adds its random state), then drop older ones."""
    root = trainer.work / CHECKPOINTS
    staging = root / f"step-{state.step}.tmp"
    if trainer.dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(staging / "model", trainer.tokenizer, trainer.spec)
        torch.save(
            {
                "state": dataclasses.asdict(state),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                "config": as_dict(trainer.cfg),
                "mine_manifest_sha256": hash_file(trainer.mine_dir / "manifest.json"),
                "world_size": trainer.dist.world_size,
            },
            staging / STATE_FILE,
        )
    barrier()
    torch.save(rng_state(), staging / f"rng-rank{trainer.dist.rank}.pt")
    if trainer.negatives is not None:
        torch.save(trainer.negatives.state_dict(), staging / f"negative-cache-rank{trainer.dist.rank}.pt")
    barrier()
    if trainer.dist.is_main:
        staging.rename(root / f"step-{state.step}")
        for old in root.glob("step-*"):
            if old.name != f"step-{state.step}":
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def restore_checkpoint(trainer: Trainer, checkpoint: Path) -> TrainState:
    """Load optimiser, schedule, scaler, random state and data position (the weights are already loaded)."""
    saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    current = as_dict(trainer.cfg)
    check_same_settings(checkpoint, saved["config"], current)
    if saved["mine_manifest_sha256"] != hash_file(trainer.mine_dir / "manifest.json"):
        raise RagkitError(f"{checkpoint}: the mine artifact {trainer.mine_dir} was rebuilt since (pass --overwrite to start over)")
    if saved["world_size"] != trainer.dist.world_size:
        raise RagkitError(
            f"{checkpoint}: was written by {saved['world_size']} processes, this run has {trainer.dist.world_size} "
            f"(resume with the same number of processes)"
        )
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(saved["scaler"])
    set_rng_state(torch.load(checkpoint / f"rng-rank{trainer.dist.rank}.pt", map_location="cpu", weights_only=True))
    if trainer.negatives is not None:
        trainer.negatives.load_state_dict(
            torch.load(checkpoint / f"negative-cache-rank{trainer.dist.rank}.pt", map_location="cpu", weights_only=True)
        )
    return TrainState(**saved["state"])


def check_same_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings (other than :data:`RESUMABLE_CHANGES`) changed since ``checkpoint``."""
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        name = changed[0]
        raise RagkitError(
            f"{checkpoint}: was trained with {name}={saved.get(name)!r}, now {name}={current[name]!r} "
            f"(resume with the same settings, or pass --overwrite to start over)"
        )


def latest_checkpoint(work: Path) -> Path | None:
    """The complete ``checkpoints/step-K`` with the largest K, if any."""
    found = []
    for path in (work / CHECKPOINTS).glob("step-*"):
        suffix = path.name[len("step-"):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step``: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# --- random state ------------------------------------------------------------------------------------


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
