"""BM25 backends side by side: bm25s vs rank-bm25 on one generated corpus, then bm25s at a million passages.

Each measurement runs in its own subprocess so its peak RSS is its own. Passages are ~100 words drawn
from a Zipf-distributed 50k-word vocabulary (common words get the near-zero or negative idf real text
has); each question takes 6 words of a random passage plus 2 random words. The corpus is generated once
into a temporary file that every subprocess streams (generation is not timed), both backends index it
through ragkit's tokenizer, and their top-100 lists are compared tie-aware (rank-bm25's scores divided
by k1 + 1).

    python benchmarks/bench_bm25.py                                  # full scale: 100k + 1M passages
    python benchmarks/bench_bm25.py --passages 10000 --questions 50 --big-passages 0   # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 50_000
ZIPF = 1.07
K = 100


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocabulary() -> tuple[np.ndarray, np.ndarray]:
    words = np.array([f"w{i}" for i in range(VOCAB)])
    p = 1.0 / np.arange(1, VOCAB + 1) ** ZIPF
    return words, p / p.sum()


def passages(n: int, seed: int, chunk: int = 10_000):
    """``n`` passages of 80..120 words, generated chunk by chunk (memory stays flat at any ``n``)."""
    words, p = _vocabulary()
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(p)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        lengths = rng.integers(80, 121, size=count)
        ids = np.searchsorted(cdf, rng.random(lengths.sum()), side="right").clip(max=VOCAB - 1)
        for piece in np.split(words[ids], np.cumsum(lengths)[:-1]):
            yield " ".join(piece)


def write_data(directory: Path, n_passages: int, n_questions: int, seed: int) -> Path:
    """``passages.txt`` (one passage a line) and ``questions.txt`` in ``directory``."""
    words, p = _vocabulary()
    rng = np.random.default_rng(seed + 1)
    targets = set(rng.choice(n_passages, size=n_questions, replace=False).tolist())
    picked = []
    with open(directory / "passages.txt", "w") as handle:
        for row, text in enumerate(passages(n_passages, seed)):
            handle.write(text + "\n")
            if row in targets:
                picked.append(list(rng.choice(text.split(), size=6, replace=False)))
    queries = [" ".join(q + list(rng.choice(words, size=2, p=p))) for q in picked]
    (directory / "questions.txt").write_text("\n".join(queries) + "\n")
    return directory


def _lines(path: Path):
    with open(path) as handle:
        for line in handle:
            yield line.rstrip("\n")


def worker(args: argparse.Namespace) -> None:
    """One backend in this process: index, search, report timings and memory as one JSON line."""
    from ragkit.bm25 import BM25Index, Tokenizer

    data = Path(args.data)
    queries = list(_lines(data / "questions.txt"))
    baseline = _rss_mb()
    index = BM25Index.create(args.worker, Tokenizer(), "robertson", args.k1, args.b, threads=args.threads)
    start = time.perf_counter()
    index.index(_lines(data / "passages.txt"))
    index_s = time.perf_counter() - start
    after_index = _rss_mb()
    index.search(queries[:2], K)  # warm-up: first-call allocations are not throughput
    start = time.perf_counter()
    indices, scores = index.search(queries, K)
    search_s = time.perf_counter() - start
    np.savez(data / f"{args.worker}.npz", indices=indices, scores=scores)
    print(json.dumps({
        "backend": args.worker, "passages": index.num_passages, "questions": len(queries),
        "index_s": index_s, "search_s": search_s, "qps": len(queries) / search_s,
        "baseline_mb": baseline, "after_index_mb": after_index, "peak_mb": _peak_rss_mb(),
    }))


def run_worker(backend: str, data: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", backend, "--data", str(data),
        "--k1", str(args.k1), "--b", str(args.b), "--threads", str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{backend} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000, help="Corpus size for the side-by-side run.")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--big-passages", type=int, default=1_000_000, help="Corpus size for the bm25s-only run (0: skip).")
    parser.add_argument("--big-questions", type=int, default=1000)
    parser.add_argument("--k1", type=float, default=1.5)
    parser.add_argument("--b", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=2, help="bm25s top-k threads.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from ragkit.bm25 import rankings_agree

    print(f"{args.passages:,} passages (~100 words), {args.questions} questions, top-{K}, k1={args.k1} b={args.b}")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), args.passages, args.questions, args.seed)
        results = {backend: run_worker(backend, data, args) for backend in ("bm25s", "rank-bm25")}
        fast, ref = (np.load(data / f"{b}.npz") for b in ("bm25s", "rank-bm25"))
        bad = rankings_agree(fast["indices"], fast["scores"], ref["indices"], ref["scores"] / (args.k1 + 1), atol=1e-4)
    a, r = results["bm25s"], results["rank-bm25"]
    print(f"{'':22}{'bm25s':>12}{'rank-bm25':>12}{'ratio':>10}")
    print(f"{'index time (s)':22}{a['index_s']:12.1f}{r['index_s']:12.1f}{r['index_s'] / a['index_s']:10.1f}x")
    print(f"{'questions/s':22}{a['qps']:12.1f}{r['qps']:12.2f}{a['qps'] / r['qps']:10.0f}x")
    print(f"{'peak RSS (MB)':22}{a['peak_mb']:12.0f}{r['peak_mb']:12.0f}{r['peak_mb'] / a['peak_mb']:10.1f}x")
    print(f"{'index RSS (MB)':22}{a['after_index_mb'] - a['baseline_mb']:12.0f}{r['after_index_mb'] - r['baseline_mb']:12.0f}")
    print(f"identical top-{K} (tie-aware): {'yes' if not bad else f'NO, {len(bad)} of {args.questions} questions differ'}")

    if args.big_passages:
        with tempfile.TemporaryDirectory() as tmp:
            big = run_worker("bm25s", write_data(Path(tmp), args.big_passages, args.big_questions, args.seed), args)
        print(f"\nbm25s, {args.big_passages:,} passages, {big['questions']} questions: index {big['index_s']:.0f} s, "
              f"{big['qps']:.0f} questions/s, peak RSS {big['peak_mb']:.0f} MB "
              f"(index {big['after_index_mb'] - big['baseline_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
