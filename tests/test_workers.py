"""Worker processes die with the process that started them, and a killed stage is cleaned up by the next run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ragkit
from test_mining import generate_corpus

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="kills with SIGKILL")

POOL_SCRIPT = """
import signal
import sys
import time

from ragkit.workers import process_pool


def ignore_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def nap(seconds):
    time.sleep(seconds)


if __name__ == "__main__":
    method, on_sigterm = sys.argv[1], sys.argv[2]
    pool = process_pool(2, ignore_sigterm if on_sigterm == "ignore" else None, method=method)
    for future in [pool.submit(nap, 0.2) for _ in range(2)]:
        future.result()
    print("ready", flush=True)
    time.sleep(600)
"""


def _env():
    root = str(Path(ragkit.__file__).parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _poll(probe, timeout_s, what):
    """The first truthy ``probe()`` within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _running(processes):
    """Those still running; a zombie (exited, not yet reaped by its new parent) counts as gone."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill_and_check_descendants_exit(proc, descendants, timeout_s=10):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped, so it is gone for the workers' liveness checks too
    try:
        _poll(lambda: not _running(descendants), timeout_s, "the workers to exit")
    finally:
        for process in _running(descendants):
            process.kill()


@pytest.mark.parametrize("method,on_sigterm", [("fork", "default"), ("forkserver", "default"), ("spawn", "default"),
                                               ("fork", "ignore")])
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path, method, on_sigterm):
    # "ignore": the worker ignores the parent-death SIGTERM, so the watcher thread has to end it.
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), method, on_sigterm], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2
        _kill_and_check_descendants_exit(proc, descendants)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
def test_killed_mine_leaves_no_workers_and_the_next_run_removes_its_staging_dir(tmp_path):
    raw = generate_corpus(tmp_path / "raw", n_passages=2000, n_questions=400)
    ingest = ragkit.ingest([str(raw / "passages.tsv"), f"train={raw / 'train.jsonl'}"], str(tmp_path / "ingest")).path
    out = tmp_path / "mine"
    command = [sys.executable, "-m", "ragkit.cli", "mine", str(ingest), "--out", str(out), "--workers", "2",
               "--chunk-size", "20", "--depth", "300"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        parent = psutil.Process(proc.pid)

        def started():
            workers = parent.children(recursive=True)
            staging = list(tmp_path.glob(".mine.tmp-*"))
            return (workers, staging) if len(workers) >= 2 and staging else None

        workers, staging = _poll(started, 60, "the workers and the staging directory")
        _kill_and_check_descendants_exit(proc, workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists(), "the run finished before it was killed: make the corpus bigger"
    assert staging[0].is_dir()

    again = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert ragkit.artifacts.Manifest.load(out).stage == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mine.")] == []
    assert f"removed {staging[0].name}" in again.stderr
