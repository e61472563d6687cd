"""Gradient cache against the plain step on the packaged all-MiniLM-L6-v2: peak memory and time per step.

One training step (forward, contrastive loss with in-batch negatives, backward; no optimizer) on queries
of 32 tokens and passages of 128 tokens, for each batch size, in three modes:

- ``plain``:   ``ragkit.retriever.gradcache.full_batch_step``, the whole batch in one graph;
- ``cached``:  ``ragkit.retriever.gradcache.GradCache`` with chunks of ``--chunk`` rows;
- ``st``:      sentence-transformers' ``CachedMultipleNegativesRankingLoss`` with ``mini_batch_size=--chunk``
               on the same weights, the same loss (cosine, scale 20 = temperature 0.05) and the same tokens.

Every (mode, batch) runs in its own subprocess so its peak RSS is its own. A plain batch whose extrapolated
peak RSS exceeds ``--max-rss-gb`` is skipped with a note. The first step of every run starts from the
same seed, so ``cached`` and ``st`` (same chunking, same dropout draws) print the same loss in fp32; under
``--bf16`` they differ in the third decimal, as CMNRL scores its similarities under autocast where ragkit's
loss runs in float32.

Printed targets: cached peak RSS at the largest batch / plain peak RSS at the smallest batch (<= 1.3);
cached / plain time per example at the largest batch the plain step fits (<= 1.35); cached / st time per
step (<= 1.0).

    python benchmarks/bench_gradcache.py                  # full scale: batches 16 .. 512, 1 warmup + 3 timed steps
    python benchmarks/bench_gradcache.py --bf16           # the same under bfloat16 autocast
    python benchmarks/bench_gradcache.py --scale small    # batches 16 and 32, one step: a smoke run
    python benchmarks/bench_gradcache.py --bf16 --ab 512 --rounds 4   # cached vs CMNRL, interleaved

``--ab BATCH`` times the cached step and CMNRL in one process, alternating (ABBA order) for ``--rounds``
rounds after one warmup step each, so that both see the same machine load; it prints every step time and
the ratio of the medians. On a shared machine this is the fairer time comparison of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SCALES = {
    "small": {"batches": [16, 32], "steps": 1, "warmup": 0},
    "full": {"batches": [16, 32, 64, 128, 256, 512], "steps": 3, "warmup": 1},
}
MODES = ("plain", "cached", "st")
QUERY_LENGTH, PASSAGE_LENGTH = 32, 128
TEMPERATURE = 0.05


def token_batch(tokenizer, rows: int, length: int, generator):
    """Full-length random token sequences ``[CLS] ... [SEP]``: every row costs the same, as in the worst case."""
    import torch

    input_ids = torch.randint(1000, tokenizer.vocab_size, (rows, length), generator=generator)
    input_ids[:, 0] = tokenizer.cls_token_id
    input_ids[:, -1] = tokenizer.sep_token_id
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def setup(batch: int, args):
    """Threads, the packaged MiniLM's path, a seeded query and passage batch, and the autocast dtype."""
    import torch
    from transformers.utils import logging as hf_logging

    from ragkit.retriever.encoder import load_tokenizer, resolve_model_path

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("minilm")
    tokenizer = load_tokenizer(path)
    generator = torch.Generator().manual_seed(0)
    query = token_batch(tokenizer, batch, QUERY_LENGTH, generator)
    passage = token_batch(tokenizer, batch, PASSAGE_LENGTH, generator)
    return path, query, passage, torch.bfloat16 if args.bf16 else None


def run_worker(mode: str, batch: int, args) -> dict:
    """One configuration in this process: returns seconds per step, peak RSS and the first step's loss."""
    import torch

    from ragkit.retriever.encoder import BiEncoder
    from ragkit.retriever.gradcache import GradCache, full_batch_step
    from ragkit.retriever.losses import ContrastiveLoss

    path, query, passage, autocast_dtype = setup(batch, args)

    if mode == "st":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        model = SentenceTransformer(path, device="cpu").train()
        st_loss = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=args.chunk)
        features = [{**query, "token_type_ids": torch.zeros_like(query["input_ids"])},
                    {**passage, "token_type_ids": torch.zeros_like(passage["input_ids"])}]

        def step():
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                value = st_loss(features, None)
                value.backward()  # the cached second pass runs inside this backward
            return value.detach()
    else:
        model = BiEncoder.from_pretrained(path).train()
        loss_fn = ContrastiveLoss(temperature=TEMPERATURE, similarity="cos")
        if mode == "cached":
            step_fn = GradCache(model, loss_fn, args.chunk, args.chunk, autocast_dtype=autocast_dtype)
        else:
            def step_fn(q, p):
                return full_batch_step(model, loss_fn, q, p, autocast_dtype=autocast_dtype)

        def step():
            return step_fn(query, passage)

    torch.manual_seed(0)
    seconds, first_loss = [], None
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        value = step()
        model.zero_grad(set_to_none=True)
        if index >= args.warmup:
            seconds.append(time.perf_counter() - start)
        first_loss = float(value) if first_loss is None else first_loss
    return {
        "seconds_per_step": sum(seconds) / len(seconds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": first_loss,
    }


def run_ab(batch: int, args) -> None:
    """Cached step and CMNRL on the same weights and tokens, alternated in this process (ABBA)."""
    import statistics

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    from ragkit.retriever.encoder import BiEncoder
    from ragkit.retriever.gradcache import GradCache
    from ragkit.retriever.losses import ContrastiveLoss

    path, query, passage, autocast_dtype = setup(batch, args)
    model = BiEncoder.from_pretrained(path).train()
    cached = GradCache(model, ContrastiveLoss(temperature=TEMPERATURE, similarity="cos"), args.chunk, args.chunk,
                       autocast_dtype=autocast_dtype)
    st_model = SentenceTransformer(path, device="cpu").train()
    st_loss = CachedMultipleNegativesRankingLoss(st_model, scale=1 / TEMPERATURE, mini_batch_size=args.chunk)
    features = [{**query, "token_type_ids": torch.zeros_like(query["input_ids"])},
                {**passage, "token_type_ids": torch.zeros_like(passage["input_ids"])}]

    def ours() -> None:
        cached(query, passage)
        model.zero_grad(set_to_none=True)

    def theirs() -> None:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            st_loss(features, None).backward()
        st_model.zero_grad(set_to_none=True)

    steps = {"cached": ours, "st": theirs}
    for step in steps.values():
        step()  # warmup
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        order = ["cached", "st"] if round_ % 2 == 0 else ["st", "cached"]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - start)
    print(f"all-MiniLM-L6-v2, q{QUERY_LENGTH}/p{PASSAGE_LENGTH}, batch {batch}, chunk {args.chunk}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} threads, {args.rounds} interleaved rounds")
    for name, values in seconds.items():
        print(f"  {name:6s} s/step: {' '.join(f'{v:.2f}' for v in values)}   median {statistics.median(values):.2f}")
    ratio = statistics.median(seconds["cached"]) / statistics.median(seconds["st"])
    print(f"time per step, cached / sentence-transformers CMNRL at batch {batch}, interleaved: {ratio:.2f} (target <= 1.0)")


def run_in_subprocess(mode: str, batch: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, str(batch), "--chunk", str(args.chunk),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.bf16:
        command.append("--bf16")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        reason = "killed, likely out of memory" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
        return {"error": f"exit {done.returncode}: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_rss_mb(measured: dict[int, dict], batch: int) -> float | None:
    """Linear extrapolation in the batch size from the two largest measured batches."""
    points = sorted((b, r["peak_rss_mb"]) for b, r in measured.items() if "peak_rss_mb" in r)
    if len(points) < 2:
        return None
    (b0, m0), (b1, m1) = points[-2:]
    return m1 + (m1 - m0) / (b1 - b0) * (batch - b1)


def fmt(result: dict | None, key: str, pattern: str) -> str:
    if result is None:
        return "-"
    if key not in result:
        return "skipped" if "skipped" in result else "failed"
    return pattern.format(result[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], help="override the scale's batch sizes")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default from --scale)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default from --scale)")
    parser.add_argument("--chunk", type=int, default=16, help="rows per chunk for the cached modes")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--bf16", action="store_true", help="run every mode under bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-rss-gb", type=float,
                        default=0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                        help="skip plain batches predicted to need more (default: 80%% of RAM)")
    parser.add_argument("--ab", type=int, metavar="BATCH", help="only: cached vs CMNRL at BATCH, interleaved in one process")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds for --ab")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = SCALES[args.scale]
    args.steps = preset["steps"] if args.steps is None else args.steps
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup

    if args.worker:
        print(json.dumps(run_worker(args.worker[0], int(args.worker[1]), args)))
        return
    if args.ab:
        run_ab(args.ab, args)
        return

    batches = args.batches or preset["batches"]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)} (choose from {', '.join(MODES)})")
    print(f"all-MiniLM-L6-v2, q{QUERY_LENGTH}/p{PASSAGE_LENGTH}, in-batch negatives, chunk {args.chunk}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} threads, {args.warmup} warmup + {args.steps} timed steps")
    results: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    for batch in batches:
        for mode in modes:
            if mode == "plain":
                predicted = predicted_rss_mb(results["plain"], batch)
                if predicted is not None and predicted > args.max_rss_gb * 1024:
                    results[mode][batch] = {"skipped": f"predicted {predicted / 1024:.1f} GB > {args.max_rss_gb:.1f} GB"}
                    print(f"  plain  batch {batch:4d}: skipped, {results[mode][batch]['skipped']}", flush=True)
                    continue
            results[mode][batch] = run_in_subprocess(mode, batch, args)
            result = results[mode][batch]
            line = result.get("error") or (f"{result['seconds_per_step']:.2f} s/step, peak RSS {result['peak_rss_mb']:.0f} MB, "
                                           f"first loss {result['loss']:.5f}")
            print(f"  {mode:6s} batch {batch:4d}: {line}", flush=True)

    print()
    header = ["batch"] + [f"{m} s/step" for m in modes] + [f"{m} peak MB" for m in modes]
    if {"plain", "cached"} <= set(modes):
        header.append("cached/plain s/example")
    if {"st", "cached"} <= set(modes):
        header.append("cached/st s/step")
    print(" | ".join(header))
    for batch in batches:
        row = [str(batch)]
        row += [fmt(results[m].get(batch), "seconds_per_step", "{:.2f}") for m in modes]
        row += [fmt(results[m].get(batch), "peak_rss_mb", "{:.0f}") for m in modes]
        if {"plain", "cached"} <= set(modes):
            row.append(ratio(results["cached"].get(batch), results["plain"].get(batch), "seconds_per_step"))
        if {"st", "cached"} <= set(modes):
            row.append(ratio(results["cached"].get(batch), results["st"].get(batch), "seconds_per_step"))
        print(" | ".join(row))

    print()
    if {"plain", "cached"} <= set(modes):
        plain_ok = [b for b in batches if "seconds_per_step" in results["plain"].get(b, {})]
        cached_ok = [b for b in batches if "seconds_per_step" in results["cached"].get(b, {})]
        if plain_ok and cached_ok:
            big, small = max(cached_ok), min(plain_ok)
            print(f"peak RSS, cached batch {big} / plain batch {small}: "
                  f"{ratio(results['cached'][big], results['plain'][small], 'peak_rss_mb')} (target <= 1.3)")
            both = [b for b in plain_ok if b in cached_ok]
            if both:
                b = max(both)
                print(f"time per example, cached / plain at batch {b}: "
                      f"{ratio(results['cached'][b], results['plain'][b], 'seconds_per_step')} (target <= 1.35)")
    if {"st", "cached"} <= set(modes):
        both = [b for b in batches if "seconds_per_step" in results["cached"].get(b, {})
                and "seconds_per_step" in results["st"].get(b, {})]
        if both:
            b = max(both)
            print(f"time per step, cached / sentence-transformers CMNRL at batch {b}: "
                  f"{ratio(results['cached'][b], results['st'][b], 'seconds_per_step')} (target <= 1.0)")
            print(f"first-step loss, cached {results['cached'][b]['loss']:.6f} vs CMNRL {results['st'][b]['loss']:.6f}")


def ratio(numerator: dict | None, denominator: dict | None, key: str) -> str:
    if not numerator or not denominator or key not in numerator or key not in denominator:
        return "-"
    return f"{numerator[key] / denominator[key]:.2f}"


if __name__ == "__main__":
    main()
