"""`ragkit answer` latency and throughput: greedy (RAG-Token) vs thorough and fast (RAG-Sequence), side by side.

One reader (a generator + an index), one sample of questions; each decoding answers the sample twice:

* one question at a time: p50 / p95 latency per question (retrieval + reading + decoding);
* in batches of ``--batch-size`` questions: questions per second.

Retrieval is included (it is a small share: one query encoding and one FAISS search per batch). The
decodings alternate question by question in the latency pass, so load on a shared machine falls on all
of them alike; the table reports ratios to greedy as well as absolute figures.

    python benchmarks/bench_answer.py --reader smollm2 --index artifacts/demo/index --split dev \
        [--questions 32] [--n-docs 5] [--batch-size 8] [--precision bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragkit.evaluation import find_ingest, load_questions  # noqa: E402
from ragkit.artifacts import read_upstream  # noqa: E402
from ragkit.reader.answer import sample_rows  # noqa: E402
from ragkit.reader.decode import DecodingOptions  # noqa: E402
from ragkit.reader.rag import RagReader  # noqa: E402

DECODINGS = ("greedy", "thorough", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reader", default="smollm2")
    parser.add_argument("--index", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(find_ingest(read_upstream(args.index, "index")), args.split)
    texts = questions.select(sample_rows(len(questions), args.questions, 0))["question"]
    reader = RagReader.load(args.reader, index=args.index, device="cpu", precision=args.precision)
    retriever = reader.retriever(args.index, precision=args.precision)
    options = DecodingOptions(max_new_tokens=args.max_new_tokens)
    reader.answer(texts[:2], retriever, args.n_docs, "greedy", options)  # warm-up

    latency: dict[str, list[float]] = {d: [] for d in DECODINGS}
    for text in texts:
        for decoding in DECODINGS:
            started = time.perf_counter()
            reader.answer([text], retriever, args.n_docs, decoding, options)
            latency[decoding].append(time.perf_counter() - started)
    throughput: dict[str, float] = {}
    for decoding in DECODINGS:
        started = time.perf_counter()
        for start in range(0, len(texts), args.batch_size):
            reader.answer(texts[start : start + args.batch_size], retriever, args.n_docs, decoding, options)
        throughput[decoding] = len(texts) / (time.perf_counter() - started)

    print(f"{len(texts)} questions, n_docs {args.n_docs}, reader {args.reader}, precision {args.precision}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'decoding':<10} {'p50 s':>8} {'p95 s':>8} {'x greedy':>9} {'q/s batch ' + str(args.batch_size):>14} {'x greedy':>9}")
    base_p50, base_qps = float(np.median(latency["greedy"])), throughput["greedy"]
    for decoding in DECODINGS:
        p50, p95 = float(np.median(latency[decoding])), float(np.percentile(latency[decoding], 95))
        print(f"{decoding:<10} {p50:>8.2f} {p95:>8.2f} {p50 / base_p50:>9.2f} {throughput[decoding]:>14.2f} "
              f"{throughput[decoding] / base_qps:>9.2f}")


if __name__ == "__main__":
    main()
