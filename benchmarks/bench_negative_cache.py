"""Negative cache: memory of a filled cache against its own ``nbytes``, and the per-step cost of using it.

For each storage dtype, a fresh process allocates a ``NegativeCache`` of ``--size`` entries (MiniLM
width 384, passages of 128 tokens by default), fills it through ``add`` in batches, and reports the
growth of its resident set against ``cache.nbytes`` (the target: within a few percent; freed heap is
handed back to the OS before both readings) and the peak growth during the fill. Then it times
one training step's cache work for ``--queries`` queries: scoring the whole cache, the masked
Gumbel-Max draw (with and without ``--top-k``), building the re-encoding inputs, adding the batch's
passages to a full cache, and writing the refreshed embeddings back.

    python benchmarks/bench_negative_cache.py                 # full scale: 65,536 entries
    python benchmarks/bench_negative_cache.py --size 4096     # quick check
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import resource
import time

import psutil
import torch

from ragkit.retriever.negative_cache.sharded import refresh_drawn
from ragkit.retriever.negative_cache.store import NegativeCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILL_BATCH = 1024


def _source(rows: int, dim: int, seq: int, generator: torch.Generator):
    """One batch of passages (embeddings and right-padded text-pair tokens) reused for every fill step."""
    embeddings = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=generator)
    columns = torch.arange(seq)
    mask = (columns < lengths[:, None]).long()
    types = ((columns >= (lengths // 4)[:, None]) & mask.bool()).long()
    input_ids = torch.randint(1000, 30_000, (rows, seq), generator=generator) * mask
    return embeddings, input_ids, mask, types


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the baseline does not hide reusable memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(dtype_name: str, size: int, dim: int, seq: int, queries: int, group: int, samples: int,
             top_k: int, steps: int, threads: int, out: mp.Queue) -> None:
    """Runs in a fresh process so the RSS baseline holds nothing from another dtype's cache."""
    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    batch = min(FILL_BATCH, size)
    embeddings, input_ids, mask, types = _source(batch, dim, seq, generator)
    # Warm the code path (allocator arenas, lazy kernels) on a tiny cache before the baseline.
    warm = NegativeCache(batch, dim, seq, dtype=DTYPES[dtype_name])
    warm.add(embeddings, torch.arange(batch), input_ids, mask, types)
    del warm
    _release_freed_heap()
    before, peak_before = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    start = time.perf_counter()
    cache = NegativeCache(size, dim, seq, dtype=DTYPES[dtype_name], policy="lru")
    for offset in range(0, size, batch):
        count = min(batch, size - offset)
        cache.add(embeddings[:count], torch.arange(offset, offset + count), input_ids[:count], mask[:count],
                  types[:count])
    fill_s = time.perf_counter() - start
    _release_freed_heap()  # the fill's temporaries are gone; what stays resident is the cache
    extra = _rss() - before
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert len(cache) == size

    query = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    positives = [[q * 7 % size] for q in range(queries)]
    batch_ids = torch.randint(0, size, (queries * group,), generator=generator)
    fresh_ids = torch.arange(size, size + queries * group)  # new passages: each add evicts
    rows = torch.arange(queries * group) % batch
    draw_generator = torch.Generator().manual_seed(1)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps * 1000

    def draw(top: int | None):
        return cache.draw(query, num_samples=samples, generator=draw_generator, temperature=0.05,
                          excluded_ids=positives, batch_ids=batch_ids, top_k=top)

    drawn = draw(None)
    step = {"add": 0}

    def add_batch():
        shift = step["add"] * queries * group
        step["add"] += 1
        cache.add(embeddings[rows], fresh_ids + shift, input_ids[rows], mask[rows], types[rows])

    times = {
        "scores": timed(lambda: cache.scores(query, temperature=0.05)),
        "draw": timed(lambda: draw(None)),
        f"draw top-{top_k}": timed(lambda: draw(top_k)),
        "refresh": timed(lambda: refresh_drawn(cache, drawn, drawn.cached.flatten(0, 1))),
        "add": timed(add_batch),
    }
    out.put({"dtype": dtype_name, "nbytes": cache.nbytes, "extra": extra, "peak_extra": peak_extra,
             "fill_s": fill_s, "times": times})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=65_536, help="cache entries (the scale)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seq", type=int, default=128, help="stored tokens per passage")
    parser.add_argument("--queries", type=int, default=64, help="queries per step")
    parser.add_argument("--group", type=int, default=2, help="passages per query added each step")
    parser.add_argument("--samples", type=int, default=1, help="cache draws per query")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = []
    for name in DTYPES:
        queue = context.Queue()
        worker = context.Process(target=_measure, args=(name, args.size, args.dim, args.seq, args.queries,
                                                        args.group, args.samples, args.top_k, args.steps,
                                                        args.threads, queue))
        worker.start()
        results.append(queue.get())
        worker.join()
        if worker.exitcode:
            raise SystemExit(f"the {name} measurement failed (exit code {worker.exitcode})")

    mib = 1 << 20
    threads = args.threads or torch.get_num_threads()
    print(f"negative cache: {args.size:,} entries, dim {args.dim}, {args.seq} tokens, torch threads "
          f"{threads}; per step {args.queries} queries x {args.samples} draw(s), "
          f"{args.queries * args.group} passages added")
    print(f"{'dtype':<6}{'nbytes MiB':>12}{'extra RSS MiB':>15}{'RSS/nbytes':>12}{'peak extra MiB':>16}{'fill s':>8}")
    for r in results:
        print(f"{r['dtype']:<6}{r['nbytes'] / mib:>12.1f}{r['extra'] / mib:>15.1f}{r['extra'] / r['nbytes']:>12.3f}"
              f"{r['peak_extra'] / mib:>16.1f}{r['fill_s']:>8.2f}")
    names = list(results[0]["times"])
    print(f"\n{'ms per step':<16}" + "".join(f"{r['dtype']:>10}" for r in results) + f"{'bf16/fp32':>11}")
    for key in names:
        values = [r["times"][key] for r in results]
        print(f"{key:<16}" + "".join(f"{v:>10.2f}" for v in values) + f"{values[1] / values[0]:>11.2f}")
    print(f"\nbf16 storage / fp32 storage: {results[1]['nbytes'] / results[0]['nbytes']:.3f} of the bytes")


if __name__ == "__main__":
    main()
