"""Run a test worker in two (or more) ``gloo`` processes on 127.0.0.1 and collect what they saved."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_and_collect(worker: Callable[[int, int, str], None], world: int, out_dir: Path, timeout_s: float = 120):
    """Spawn ``worker(rank, port, out_dir)`` in ``world`` processes; return every ``out_dir/*.pt`` by stem.

    A run that outlasts ``timeout_s`` is killed and the test fails, instead of hanging the suite.
    """
    context = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} gloo processes did not finish within {timeout_s:.0f} s")
    return {path.stem: torch.load(path) for path in Path(out_dir).glob("*.pt")}
