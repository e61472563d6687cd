"""Worker process pools whose workers never outlive the process that started them.

A ``ProcessPoolExecutor`` worker waits for tasks on a pipe whose write end it inherited itself, so when
its parent is killed (``kill -9``, the out-of-memory killer) it never sees end-of-file: it sleeps on,
orphaned, holding its memory. Every pool in ragkit comes from :func:`process_pool`, whose workers arm
two guards before running their own initializer:

- **Linux**: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so the kernel signals the worker the moment its
  parent dies. The kernel ties this to the parent *thread* that started the worker: a pool's workers are
  started by the thread that calls ``submit`` (all of them at the first call with ``fork``, one per call
  with ``spawn`` and ``forkserver``; never by the pool's manager thread, since ``max_tasks_per_child`` is
  not used), so create and feed a pool from a thread that lives as long as the pool.
- **Everywhere**: a daemon thread that ends the worker with ``os._exit`` once the parent is gone: on
  POSIX when the worker is re-parented (``os.getppid()`` changes) or the process that made the pool no
  longer exists; on Windows, where orphans are not re-parented, when the parent's process handle is
  signalled. It also covers a worker whose ``SIGTERM`` is handled by some library rather than ending it,
  and ``forkserver``: there the parent is the fork server, which stays up while any worker holds its
  pipe, so the workers watch the pool's owner itself (the fork server follows once they are gone).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

PR_SET_PDEATHSIG = 1
"""``prctl`` option from ``<linux/prctl.h>``."""
ORPHAN_EXIT_CODE = 1
POLL_SECONDS = 0.5


def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    method: str | None = None,
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes that exit when this process dies.

    ``method`` is the multiprocessing start method; by default ``fork`` on Linux (cheap; start the pool
    before this process runs threads of its own) and ``spawn`` elsewhere.
    """
    import multiprocessing

    method = method or ("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, tuple(initargs)),
    )


def _init_worker(owner: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    exit_with_parent(owner)
    if initializer is not None:
        initializer(*initargs)


def exit_with_parent(owner: int, poll_seconds: float = POLL_SECONDS) -> None:
    """Make this (worker) process exit once its parent, or the process ``owner`` that made the pool, dies."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        set_parent_death_signal(signal.SIGTERM)
    # A parent that died before the signal was armed left this process re-parented already.
    if _parent_gone(owner, parent):
        os._exit(ORPHAN_EXIT_CODE)
    watcher = threading.Thread(
        target=_watch_parent, args=(owner, parent, poll_seconds), name="ragkit-parent-watch", daemon=True
    )
    watcher.start()


def set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent thread exits. False if unavailable."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def _watch_parent(owner: int, parent: int, poll_seconds: float) -> None:
    if sys.platform == "win32":
        import multiprocessing

        handle = multiprocessing.parent_process()
        if handle is None:
            return
        handle.join()  # returns when the parent's process handle is signalled, i.e. it has exited
    else:
        while not _parent_gone(owner, parent):
            time.sleep(poll_seconds)
    os._exit(ORPHAN_EXIT_CODE)


def _parent_gone(owner: int, parent: int) -> bool:
    """POSIX: re-parented since ``parent`` was seen, or the pool's ``owner`` no longer exists."""
    if sys.platform == "win32":
        import multiprocessing

        handle = multiprocessing.parent_process()
        return handle is not None and not handle.is_alive()
    if os.getppid() != parent:
        return True
    return owner != parent and not pid_alive(owner)


def pid_alive(pid: int) -> bool:
    """POSIX: whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
