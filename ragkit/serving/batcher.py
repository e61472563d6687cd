"""Micro-batching: requests that arrive together are answered by one call, in a worker thread.

Each request becomes a job on a queue. One worker takes the first job and whatever else is queued, up
to ``max_batch`` jobs; under load (the previous batch held more than one job) it also waits up to
``window`` seconds for more to join, while a lone client is answered at once. It hands the batch to
``process`` in its own thread, so the event loop keeps accepting requests while the encoder and
the index work. ``process`` returns one result per job, an exception for a job that failed alone. A
request whose client went away is skipped if its batch has not started, and its result dropped if it
has. ``max_batch=1`` with no window answers one request at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence

from ..errors import RagkitError


class Busy(RagkitError):
    """More requests are pending than the server accepts; the client should retry later."""


@dataclasses.dataclass
class Job:
    """One request waiting for its batch."""

    kind: str
    """'retrieve' or 'answer'."""
    request: Any
    queued: float = dataclasses.field(default_factory=time.perf_counter)
    started: float = 0.0
    """When its batch started (perf_counter seconds)."""
    batch_size: int = 0


class MicroBatcher:
    """Queue -> batches of at most ``max_batch`` jobs -> ``process(jobs)`` in a worker thread."""

    def __init__(self, process: Callable[[list[Job]], Sequence[Any]], *, max_batch: int = 32, window: float = 0.005,
                 max_pending: int = 256) -> None:
        if max_batch < 1 or window < 0 or max_pending < 1:
            raise RagkitError(f"max_batch={max_batch} and max_pending={max_pending} must be >= 1, window={window} >= 0")
        self.process = process
        self.max_batch = max_batch
        self.window = window
        self.max_pending = max_pending
        self.pending = 0
        self.batches = 0
        self._last_batch = 0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragkit-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="ragkit-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> Any:
        """The job's result once its batch ran; raises the job's own exception, or :class:`Busy`."""
        if self._queue is None:
            raise RagkitError("the batcher is not running")
        if self.pending >= self.max_pending:
            raise Busy(f"{self.pending} requests pending (at most {self.max_pending}); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            self._queue.put_nowait((job, future))
            return await future  # a disconnected client cancels this await, which cancels the future
        finally:
            self.pending -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + (self.window if self._last_batch > 1 else 0.0)
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            waiting = [(job, future) for job, future in batch if not future.done()]
            if not waiting:
                continue
            jobs = [job for job, _ in waiting]
            started = time.perf_counter()
            for job in jobs:
                job.started, job.batch_size = started, len(jobs)
            try:
                results = await loop.run_in_executor(self._executor, self.process, jobs)
            except Exception as exc:  # the whole batch failed: each of its requests gets the error
                results = [exc] * len(jobs)
            self.batches += 1
            self._last_batch = len(batch)
            for (_, future), result in zip(waiting, results):
                if future.done():  # its client went away while the batch ran
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
