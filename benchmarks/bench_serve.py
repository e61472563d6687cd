"""Requests/s and latency of `ragkit serve`, micro-batched vs one request at a time, side by side.

Starts `ragkit serve` twice on the loopback (``--batching`` and ``--no-batching``) over the same index, and
for 1, 4 and 16 concurrent clients (threads, one HTTP connection each) sends the dev questions of the
index's ingest artifact for a fixed time, then prints requests/s, p50 / p95 latency and the mean batch::

    make -C pipelines/demo zeroshot                      # the demo index (MiniLM), if not built yet
    python benchmarks/bench_serve.py                     # /retrieve on artifacts/demo/index-minilm
    python benchmarks/bench_serve.py --index artifacts/demo/index --seconds 20 --endpoint answer --reader smollm2

Client threads and the server share the machine's cores: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragkit.artifacts import read_upstream  # noqa: E402
from ragkit.evaluation import find_ingest  # noqa: E402


def dev_questions(index: Path, limit: int) -> list[str]:
    import datasets

    ingest = find_ingest(read_upstream(index, "index"))
    split = "dev" if (ingest / "questions" / "dev").is_dir() else sorted(p.name for p in (ingest / "questions").iterdir())[0]
    questions = datasets.load_from_disk(str(ingest / "questions" / split))["question"]
    return list(questions[:limit])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`ragkit serve` in a subprocess, stopped on exit."""

    def __init__(self, args: argparse.Namespace, batching: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ragkit.cli", "serve", str(args.index), "--port", str(self.port),
                   "--poll-seconds", "0", "--device", args.device, "--max-pending", "4096",
                   "--batching" if batching else "--no-batching"]
        if batching:
            command += ["--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms)]
        if args.reader:
            command += ["--reader", args.reader]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"ragkit serve exited: {self.process.stderr.read()}")
            try:
                httpx.get(f"{self.url}/health", timeout=1).raise_for_status()
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("ragkit serve did not start within 10 minutes")
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def load(url: str, endpoint: str, body: dict, questions: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads asking in a loop for ``seconds``: requests/s, latency percentiles, mean batch."""
    latencies: list[float] = []
    batches: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(worker: int) -> None:
        mine, sizes, failed = [], [], []
        with httpx.Client(base_url=url, timeout=120) as http:
            start_line.wait()
            i = worker
            while not stop.is_set():
                question = questions[i % len(questions)]
                i += clients
                sent = time.perf_counter()
                response = http.post(f"/{endpoint}", json={"question": question, **body})
                if response.status_code != 200:
                    failed.append(f"{response.status_code} {response.text[:200]}")
                    continue
                mine.append(time.perf_counter() - sent)
                sizes.append(response.json()["timings"]["batch_size"])
        with lock:
            latencies.extend(mine)
            batches.extend(sizes)
            failures.extend(failed)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} failed requests, e.g. {failures[0]}")
    ordered = sorted(latencies)
    return {"requests": len(ordered), "rps": len(ordered) / elapsed,
            "p50": 1000 * ordered[len(ordered) // 2], "p95": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "batch": statistics.fmean(batches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=ROOT / "artifacts" / "demo" / "index-minilm")
    parser.add_argument("--endpoint", choices=("retrieve", "answer"), default="retrieve")
    parser.add_argument("--reader", help="Reader or generator for --endpoint answer.")
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients, comma-separated.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured time per cell.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured time before each server's first cell.")
    parser.add_argument("--k", type=int, default=10, help="Passages per question (k, or n_docs for answers).")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (args.index / "current").is_file():
        print(f"{args.index}: not an index artifact (build the demo index: make -C pipelines/demo zeroshot)", file=sys.stderr)
        return 2
    if args.endpoint == "answer" and not args.reader:
        print("--endpoint answer needs --reader", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",")]
    questions = dev_questions(args.index, 1000)
    body = {"k": args.k} if args.endpoint == "retrieve" else {"n_docs": args.k}
    results = {}
    for batching in (True, False):
        name = f"batched (max {args.max_batch}, {args.window_ms:g} ms)" if batching else "one at a time"
        with Server(args, batching) as server:
            load(server.url, args.endpoint, body, questions, max(clients), args.warmup)
            for count in clients:
                results[name, count] = load(server.url, args.endpoint, body, questions, count, args.seconds)
                print(f"{name:28s} {count:3d} clients: {results[name, count]['rps']:8.1f} req/s", flush=True)
    print(f"\n/{args.endpoint} on {args.index} ({len(questions)} dev questions, k={args.k}, {args.seconds:g} s per cell, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'server':28s} {'clients':>7s} {'requests':>8s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'batch':>6s}")
    for (name, count), r in results.items():
        print(f"{name:28s} {count:7d} {r['requests']:8d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p95']:8.1f} {r['batch']:6.1f}")
    names = list(dict.fromkeys(name for name, _ in results))
    for count in clients:
        print(f"speed-up of batching at {count:2d} clients: {results[names[0], count]['rps'] / results[names[1], count]['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
