"""Run every benchmark at full scale, one after another, saving each one's output.

    python benchmarks/run_all.py                 # all
    python benchmarks/run_all.py bm25 ingest     # a subset, by name

Each benchmark prints its own side-by-side table; the output is also saved to
``benchmarks/results/<name>.txt``. Run on a quiet machine: timings are wall-clock.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "ingest": ["bench_ingest.py"],
    "ingest-msmarco": ["bench_ingest.py", "--layout", "msmarco"],
    "bm25": ["bench_bm25.py"],
    "gradcache": ["bench_gradcache.py", "--bf16", "--batches", "16,64,512", "--steps", "2"],
    "negative_cache": ["bench_negative_cache.py"],
    "ablation": ["bench_ablation.py"],
    "index": ["bench_index.py"],
    "encode": ["bench_encode.py"],
}


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for name in names or list(BENCHMARKS):
        script, *args = BENCHMARKS[name]
        print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        print(output, end="")
        (results / f"{name}.txt").write_text(output, encoding="utf-8")
        print(f"=== {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
