"""Sharded, resumable passage encoding, and the merge of the shards into one matrix.

A corpus of ``P`` passages split into ``N`` shards: shard ``i`` holds rows ``[i*P//N, (i+1)*P//N)``. The
shards live in a work directory beside the output (``<parent>/.<out name>.work/shards/``)::

    plan.json                   what is being encoded: encoder fingerprint, corpus, precision, dtype, N
    00003-of-00008/             a finished shard: embeddings.npy + ids.txt (rows of shard 3)
    .00004-of-00008.tmp-1a2b/   a shard being written (renamed into place when complete)

A shard is finished when its directory carries its final name; it gets there by one rename, so a crash
leaves either a finished shard or a temporary directory the next run discards. Any number of processes or
machines may encode different shards of the same plan at once. The plan keeps shards of a different
encoding (another model, corpus, precision or dtype) from being mixed in: a mismatch is refused.

:meth:`ShardSet.merge` streams the finished shards, in order, into one memory-mapped ``embeddings.npy``
and one ``ids.txt``, a bounded number of rows at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import write_json_atomic
from ..errors import RagkitError
from .encode import EMBEDDINGS_FILE, IDS_FILE, open_embeddings

PLAN_FILE = "plan.json"
MERGE_ROWS = 65_536
"""Rows copied per step when merging shards (bounds the memory of the merge)."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise RagkitError(f"shard {self.index}/{self.count}: needs 0 <= i < N (e.g. --shard 0/8 ... --shard 7/8)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, _, count = str(text).partition("/")
        try:
            return cls(int(index), int(count))
        except ValueError:
            raise RagkitError(f"shard={text!r} is not of the form i/N (e.g. --shard 3/8)") from None

    def rows(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard among ``total`` rows."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"


def auto_shard_count(passages: int, world_size: int, rows_per_shard: int = 1_000_000) -> int:
    """Shards of about ``rows_per_shard`` rows, a multiple of ``world_size`` so every process gets as many."""
    wanted = max(1, -(-passages // rows_per_shard))
    return -(-wanted // world_size) * world_size


class ShardSet:
    """The shards of one encoding in ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path, plan: dict[str, Any]) -> None:
        self.root = Path(root)
        self.plan = plan
        self.count = int(plan["shards"])
        self.total = int(plan["passages"])

    @classmethod
    def open(cls, root: str | Path, plan: dict[str, Any], default_count: int, discard_other: bool = False) -> "ShardSet":
        """Join the encoding ``plan`` describes in ``root``, starting it when there is none.

        ``plan["shards"] = 0`` adopts the shard count of an encoding already in progress, else
        ``default_count``. A plan that differs from the one in progress is refused unless
        ``discard_other``, which deletes the other encoding's shards.
        """
        root = Path(root)
        existing = _read_plan(root)
        requested = plan
        if not plan.get("shards"):
            plan = {**plan, "shards": existing["shards"] if existing is not None else default_count}
        if existing is not None and existing != plan:
            if not discard_other:
                different = sorted(k for k in set(existing) | set(plan) if existing.get(k) != plan.get(k))
                raise RagkitError(
                    f"{root}: holds shards of another encoding ({', '.join(different)} differ) "
                    f"(finish it with the same settings, or pass --overwrite to discard it)"
                )
            shutil.rmtree(root)
            existing = None
            plan = {**plan, "shards": requested.get("shards") or default_count}
        root.mkdir(parents=True, exist_ok=True)
        if existing is None:
            write_json_atomic(root / PLAN_FILE, plan)
        return cls(root, plan)

    def shard(self, index: int) -> Shard:
        return Shard(index, self.count)

    def path(self, index: int) -> Path:
        return self.root / self.shard(index).name

    def finished(self, index: int) -> bool:
        return (self.path(index) / IDS_FILE).is_file()

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.finished(i)]

    def staging(self, index: int) -> Path:
        """A fresh temporary directory for shard ``index``; :meth:`finish` renames it into place."""
        staging = self.root / f".{self.shard(index).name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return staging

    def finish(self, index: int, staging: Path) -> None:
        start, stop = self.shard(index).rows(self.total)
        rows = open_embeddings(staging).shape[0]
        if rows != stop - start:
            raise ValueError(f"shard {index} holds {rows} rows, expected {stop - start}")
        try:
            staging.rename(self.path(index))
        except OSError:  # another process finished the same shard first: its copy is as good
            shutil.rmtree(staging, ignore_errors=True)

    def discard_staging(self) -> None:
        """Remove temporary shard directories left by crashed runs (call only when no other process writes)."""
        for stale in self.root.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def merge(self, out_dir: str | Path, dimension: int) -> Path:
        """Stream every finished shard, in order, into ``out_dir/embeddings.npy`` and ``out_dir/ids.txt``."""
        missing = self.missing()
        if missing:
            names = ", ".join(f"{i}/{self.count}" for i in missing[:5])
            raise RagkitError(f"{self.root}: shards {names} are not encoded yet (encode them, or run without --shard)")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(self.plan["dtype"])
        matrix = np.lib.format.open_memmap(out_dir / EMBEDDINGS_FILE, mode="w+", dtype=dtype,
                                           shape=(self.total, dimension))  # (P, D)
        with open(out_dir / IDS_FILE, "w", encoding="utf-8") as ids_out:
            for index in range(self.count):
                start, stop = self.shard(index).rows(self.total)
                part = open_embeddings(self.path(index))  # (stop - start, D)
                if part.shape != (stop - start, dimension) or part.dtype != dtype:
                    raise RagkitError(
                        f"{self.path(index)}: holds {part.shape} {part.dtype}, expected {(stop - start, dimension)} {dtype} "
                        f"(delete this shard directory and run again)"
                    )
                for offset in range(0, stop - start, MERGE_ROWS):
                    matrix[start + offset : min(stop, start + offset + MERGE_ROWS)] = part[offset : offset + MERGE_ROWS]
                del part
                with open(self.path(index) / IDS_FILE, encoding="utf-8") as ids_in:
                    shutil.copyfileobj(ids_in, ids_out)
        matrix.flush()
        del matrix
        return out_dir


def _read_plan(root: Path) -> dict[str, Any] | None:
    path = root / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RagkitError(f"{path}: unreadable ({exc}); delete {root} and run again") from None
