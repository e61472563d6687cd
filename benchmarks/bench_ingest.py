"""Ingest throughput and memory: passages per second and peak RSS as the corpus grows.

For each size, a synthetic corpus is streamed to disk in one of two layouts, with words drawn from a Zipf
vocabulary, and the same number of questions at every size (a real QA set does not grow with the corpus):

* ``--layout dpr``: a DPR passage tsv (documents of 100-300 words, ~2 windows of 100 words each) plus a
  jsonl of questions that name a gold document and a two-word answer from it;
* ``--layout msmarco``: an MS MARCO directory, ``collection.tsv`` (``pid<TAB>passage``, 30-70 words, ~50, so
  one window each) plus ``queries.train.tsv`` and TREC ``qrels.train.tsv`` judging one passage per query.

A fresh process then runs ``ragkit.ingest`` on them and reports its own peak RSS (``ru_maxrss``), so sizes
do not share a high-water mark. Streaming means RSS should stay almost flat: the target is
RSS(largest) / RSS(smallest) <= 1.5.

    python benchmarks/bench_ingest.py                          # full scale: 100k and 1M passages, DPR tsv
    python benchmarks/bench_ingest.py --layout msmarco         # the same sizes as an MS MARCO collection
    python benchmarks/bench_ingest.py --passages 20000 100000  # quick check
"""

from __future__ import annotations

import argparse
import bisect
import importlib
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCABULARY = 50_000


def _vocabulary() -> tuple[list[str], list[float]]:
    """Words and their cumulative Zipf weights (1/rank), for sampling by bisection."""
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, VOCABULARY + 1)))
    vocabulary = [f"tok{rank}" for rank in range(VOCABULARY)]
    return vocabulary, cumulative


def _words(rng: random.Random, vocabulary: list[str], cumulative: list[float], count: int) -> list[str]:
    total = cumulative[-1]
    return [vocabulary[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(count)]


def generate(directory: Path, passages: int, questions: int, window: int, seed: int) -> tuple[list[Path], int]:
    """Stream a passage tsv and a question jsonl holding about ``passages`` windows; returns the input paths
    and the exact number of windows."""
    rng = random.Random(seed)
    vocabulary, cumulative = _vocabulary()
    corpus, asked = directory / "psgs.tsv", directory / "questions.jsonl"
    windows_per_document = sum(-(-length // window) for length in range(100, 301)) / 201
    expected_documents = passages / windows_per_document
    windows = 0
    with open(corpus, "w", encoding="utf-8") as tsv, open(asked, "w", encoding="utf-8") as jsonl:
        tsv.write("id\ttext\ttitle\n")
        for doc in itertools.count():
            if windows >= passages:
                break
            length = rng.randint(100, 300)
            text = _words(rng, vocabulary, cumulative, length)
            tsv.write(f"{doc}\t{' '.join(text)}\tDocument {doc}\n")
            windows += -(-length // window)
            if rng.random() < questions / expected_documents:
                at = rng.randrange(length - 1)
                jsonl.write(json.dumps({"question": f"what follows {text[at - 1]}", "answers": [" ".join(text[at:at + 2])],
                                        "positive_ids": [str(doc)]}) + "\n")
    return [corpus, asked], windows


def generate_msmarco(directory: Path, passages: int, questions: int, window: int, seed: int) -> tuple[list[Path], int]:
    """Stream an MS MARCO directory: ``passages`` lines of collection.tsv (each within one window), queries and
    TREC qrels; returns the directory and the number of passages."""
    assert window >= 70, "msmarco passages are up to 70 words: one window each"
    rng = random.Random(seed)
    vocabulary, cumulative = _vocabulary()
    folder = directory / "msmarco"
    folder.mkdir()
    with open(folder / "collection.tsv", "w", encoding="utf-8") as tsv, \
            open(folder / "queries.train.tsv", "w", encoding="utf-8") as queries, \
            open(folder / "qrels.train.tsv", "w", encoding="utf-8") as qrels:
        for pid in range(passages):
            text = _words(rng, vocabulary, cumulative, rng.randint(30, 70))
            tsv.write(f"{pid}\t{' '.join(text)}\n")
            if rng.random() < questions / passages:
                qid = 1_000_000_000 + pid
                queries.write(f"{qid}\twhat follows {text[0]} {text[1]}\n")
                qrels.write(f"{qid}\t0\t{pid}\t1\n")
    return [folder], passages


LAYOUTS = {"dpr": generate, "msmarco": generate_msmarco}


def child(out: str, window: int, inputs: list[str]) -> None:
    """Runs in a fresh process: ingest, then print the timing and this process's peak RSS as JSON."""
    from ragkit import ingest

    importlib.import_module("ragkit.ingestion")  # imports are not ingest time; their RSS is reported apart

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    manifest = ingest(inputs, out, window=window)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds,
        "passages": manifest.counts["passages"],
        "documents": manifest.counts["documents"],
        "questions": sum(manifest.counts["questions"].values()),
        "without_positive": manifest.counts["questions_without_positive"],
        "import_rss_mb": baseline / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="dpr", help="DPR tsv + jsonl, or an MS MARCO directory.")
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000], help="Corpus sizes, in windows.")
    parser.add_argument("--questions", type=int, default=2000, help="Questions at every size.")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Where the generated files go (default: a temp dir).")
    parser.add_argument("--child", nargs="+", metavar="OUT WINDOW INPUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2:])
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.passages:
            start = time.perf_counter()
            inputs, windows = LAYOUTS[args.layout](Path(tmp), size, args.questions, args.window, args.seed)
            made = time.perf_counter() - start
            out = Path(tmp) / f"ingest-{size}"
            run = subprocess.run([sys.executable, __file__, "--child", str(out), str(args.window), *map(str, inputs)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            assert result["passages"] == windows, (result, windows)
            input_bytes = sum(f.stat().st_size for path in inputs for f in ([path] if path.is_file() else path.iterdir()))
            result.update(size=size, input_mb=input_bytes / 2**20, generate_seconds=made)
            results.append(result)
            print(f"{size:>10,} target: {result['passages']:>10,} passages from {result['documents']:>9,} documents "
                  f"({result['input_mb']:.0f} MiB {args.layout}) + {result['questions']:,} questions "
                  f"({result['without_positive']} without positive): {result['seconds']:7.1f} s, "
                  f"{result['passages'] / result['seconds']:>8,.0f} passages/s, peak RSS {result['peak_rss_mb']:7.1f} MiB "
                  f"(after imports {result['import_rss_mb']:.1f} MiB)", flush=True)
            subprocess.run(["rm", "-rf", str(out), *map(str, inputs)], check=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"RSS({last['passages']:,}) / RSS({first['passages']:,}) = {last['peak_rss_mb'] / first['peak_rss_mb']:.2f} "
              f"(target <= 1.5) for {last['passages'] / first['passages']:.0f}x the passages; "
              f"throughput ratio {last['passages'] / last['seconds'] / (first['passages'] / first['seconds']):.2f}")


if __name__ == "__main__":
    main()
