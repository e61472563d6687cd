"""Capture the random-number state and replay it later, so a second forward draws the same dropout masks.

The gradient cache runs every chunk forward twice: once without a graph to get its representation, and
once with the graph to push the cached gradient into the weights. With dropout on, the two forwards
compute the same function only if they draw the same masks, so the state of every generator dropout
can use (the CPU one and one per CUDA device) is saved before the first forward and restored for the
second. The restore happens inside ``torch.random.fork_rng``, which puts the live state back on exit:
the replay leaves the training run's random stream exactly where the first forward left it.
"""

from __future__ import annotations

import torch


class RngState:
    """The CPU and CUDA generator states at construction; ``with state:`` replays them.

    Example::

        state = RngState()
        with torch.no_grad():
            first = model(x)
        with state:
            second = model(x)  # same dropout masks as ``first``
    """

    def __init__(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self.cuda_states = torch.cuda.get_rng_state_all() if self.cuda_devices else []
        self._fork = None

    def __enter__(self) -> "RngState":
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda_devices:
            torch.cuda.set_rng_state_all(self.cuda_states)
        return self

    def __exit__(self, *exc_info) -> None:
        fork, self._fork = self._fork, None
        fork.__exit__(*exc_info)
