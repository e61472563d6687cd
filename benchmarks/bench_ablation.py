"""Ablation of the training objectives on one mined corpus: plain DPR, +GTE, +GIST, +negative cache.

Each variant fine-tunes the packaged all-MiniLM-L6-v2 with ``ragkit train retriever`` in its own subprocess,
with the same seed, steps, batch and hard negatives; only the objective changes:

- ``dpr``:       query->passage in-batch softmax (``--loss dpr``);
- ``gte``:       + query->query, passage->query, passage->passage pools (``--loss gte``);
- ``gist``:      DPR with a frozen guide that drops likely false negatives (``--guide minilm``: the starting
                 model itself, frozen);
- ``negcache``:  DPR plus a cache of passages from earlier steps as extra negatives (``--negative-cache N``).

With ``--chunk-size`` every variant runs through the gradient cache (same gradients, less memory), the
negative cache included. The table shows each artifact's dev scores as the trainer recorded them
(``metrics.dev`` of its manifest: the kept model, exact search) and the wall-clock seconds of the whole
``ragkit train retriever`` call (model load, training, one final evaluation), next to BM25 on the same
dev questions (``metrics.bm25_dev``). The top-20 column is accuracy@20 (an answer in the top 20, DPR's
metric) when the questions have answers, else recall@20 of the judged passages (BEIR data such as SciFact).

Data: by default the demo corpus (``data/demo/generate.py``), generated, ingested and mined into a
temporary directory at ``--scale``; ``--mine DIR`` uses an existing mine artifact instead, e.g. SciFact's
from ``make -C pipelines/scifact bm25`` (``pipelines/scifact/work/mine``).

    python benchmarks/bench_ablation.py                                  # full scale: demo data, 1 epoch
    python benchmarks/bench_ablation.py --mine pipelines/scifact/work/mine --passage-max-length 256 --chunk-size 8
    python benchmarks/bench_ablation.py --scale 0.1 --max-steps 2 --batch-size 8   # a smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dpr": ["--loss", "dpr"],
    "gte": ["--loss", "gte"],
    "gist": ["--loss", "dpr", "--guide", "minilm", "--guide-margin-strategy", "absolute", "--guide-margin", "0"],
    "negcache": ["--loss", "dpr", "--negative-cache", "{negative_cache}"],
}
COLUMNS = ("mrr@10", "ndcg@10")
TOP20 = ("accuracy@20", "recall@20")
"""The top-20 column: answer accuracy where questions have answers (DPR's metric), else recall of judged passages."""


def ragkit(*args: str, log: Path) -> float:
    """Run one ``ragkit`` command, its output appended to ``log``; return its wall-clock seconds."""
    command = [str(Path(sys.executable).with_name("ragkit")), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"`ragkit {' '.join(args[:2])}` failed (exit {proc.returncode}); see {log}")
    return seconds


def prepare_demo(work: Path, scale: float, seed: int, log: Path) -> Path:
    """Generate the demo corpus at ``scale``, ingest it and mine it; return the mine artifact."""
    data = work / "data"
    subprocess.run([sys.executable, str(ROOT / "data" / "demo" / "generate.py"), "--out", str(data),
                    "--scale", str(scale), "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    splits = [f"{split}={data / f'{split}.jsonl'}" for split in ("train", "dev", "test")]
    ragkit("ingest", str(data / "passages.tsv"), *splits, "--out", str(work / "ingest"), "--overwrite", log=log)
    ragkit("mine", str(work / "ingest"), "--out", str(work / "mine"), "--depth", "100", "--negatives", "30",
           "--overwrite", log=log)
    return work / "mine"


def train_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", "minilm", "--seed", str(args.seed), "--batch-size", str(args.batch_size),
             "--hard-negatives", str(args.hard_negatives), "--lr", str(args.lr), "--warmup", "0.1",
             "--query-max-length", "32", "--passage-max-length", str(args.passage_max_length),
             "--precision", args.precision, "--chunk-size", str(args.chunk_size), "--eval-every", "0"]
    return flags + (["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)])


def dev_row(values: dict | None, columns: tuple[str, ...]) -> str:
    values = values or {}
    return "".join(f"{values[c]:>13.3f}" if c in values else f"{'-':>13}" for c in columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mine", type=Path, help="An existing mine artifact (default: the demo data, mined here).")
    parser.add_argument("--scale", type=float, default=1.0, help="Demo data size relative to the default (1.0).")
    parser.add_argument("--work", type=Path, help="Keep the artifacts here (default: a temporary directory).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated subset of {', '.join(VARIANTS)}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="> 0: train this many steps instead of --epochs.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--passage-max-length", type=int, default=128)
    parser.add_argument("--precision", default="bf16", help="fp32 | bf16 (default bf16: AMX on this CPU).")
    parser.add_argument("--chunk-size", type=int, default=0, help="Gradient cache chunk for every variant (0: plain step).")
    parser.add_argument("--negative-cache", type=int, default=4096, help="Cached passages of the negcache variant.")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")

    with tempfile.TemporaryDirectory(prefix="ragkit-ablation-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "ablation.log"
        mine = args.mine or prepare_demo(work, args.scale, args.seed, log)
        results, reference = {}, None
        for name in variants:
            flags = [f.format(negative_cache=args.negative_cache) for f in VARIANTS[name]]
            out = work / f"retriever-{name}"
            print(f"training {name} ...", flush=True)
            seconds = ragkit("train", "retriever", str(mine), "--out", str(out), *train_flags(args), *flags,
                             "--overwrite", log=log)
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            metrics = manifest["metrics"]
            reference = reference or metrics
            results[name] = (metrics.get("dev"), seconds, manifest["counts"]["steps"])

        steps = {s for _, _, s in results.values()}
        print(f"\nmine artifact: {mine}   steps: {', '.join(map(str, sorted(steps)))}   batch {args.batch_size}, "
              f"{args.hard_negatives} hard negative(s), chunk {args.chunk_size or 'off'}, {args.precision}, seed {args.seed}")
        top20 = next((c for c in TOP20 if any(c in (dev or {}) for dev, _, _ in results.values())), TOP20[0])
        columns = (top20, *COLUMNS)
        print(f"{'variant':<12}" + "".join(f"{c:>13}" for c in columns) + f"{'seconds':>10}{'x dpr':>8}")
        print(f"{'bm25':<12}" + dev_row(reference.get("bm25_dev"), columns))
        base = results.get("dpr", (None, None, None))[1]
        for name, (dev, seconds, _) in results.items():
            ratio = f"{seconds / base:>8.2f}" if base else f"{'-':>8}"
            print(f"{name:<12}" + dev_row(dev, columns) + f"{seconds:>10.1f}" + ratio)
        if args.work is None:
            print(f"(artifacts removed with {work}; pass --work DIR to keep them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
