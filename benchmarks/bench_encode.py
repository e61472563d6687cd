"""Encoding speed, ANN search quality and encoding memory on real passages, side by side in one run.

1. **Encoding**: the same real passages (SciFact abstracts, then SQuADShifts Amazon review paragraphs, cut by
   ``ragkit ingest`` into 64-word windows; a seeded sample of ``--passages`` of the windows both libraries
   tokenise to the same ids, see below) through ragkit's encode
   path (:func:`ragkit.indexing.encode.encode_passages`) in bf16 autocast and in fp32, and through
   sentence-transformers' ``SentenceTransformer(minilm).encode`` in fp32, same model, max length and batch
   size. ragkit tokenises a passage as ``[CLS] title [SEP] text [SEP]``; sentence-transformers gets the
   string ``"title [SEP] text"``, which the same tokenizer turns into the same token ids (checked row by
   row and printed). The rows are split into ``--rounds`` chunks and the three encoders take turns on each
   chunk in rotating order (A B C, B C A, ...), so they share the machine's noise.
2. **FAISS**: the ragkit bf16 vectors of ``--faiss-passages`` real windows (those above, then more), repeated with Gaussian noise (then re-normalised)
   up to ``--vectors`` rows; ``--queries`` real SQuADShifts questions encoded by ragkit's query path.
   Each kind is built through ragkit's wrapper (:func:`ragkit.indexing.faiss_index.build_index`); build
   time, queries/s and recall@100 against Flat's exact top-100.
3. **Memory**: a fresh process per size encodes an ingest artifact of that many passages (the real
   windows repeated under new ids) through ``encode_passages`` with a short max length, and reports its
   own peak RSS while encoding (``VmHWM``, reset after the model is loaded), split by sampling into
   anonymous memory (heap: model, batches, one block of rows) and file-backed pages (the memory-mapped
   ``embeddings.npy`` being written and the Arrow passages being read, which the kernel reclaims under
   pressure). The embeddings stream to the memory map, so anonymous memory should stay flat.

    python benchmarks/bench_encode.py [--passages 20000] [--parts encode,faiss,rss] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = ROOT.parent / "shared" / "datasets"
SOURCES = {  # ingest artifact name -> what is ingested
    "scifact": [DATASETS / "scifact"],
    "amazon": [DATASETS / "squadshifts_amazon" / "amazon_reviews_v1.0.json"],
}
WINDOW = 64
K = 100


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _ingest(inputs: list[Path | str], out: Path, *flags: str) -> Path:
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ragkit.cli", "ingest", *map(str, inputs), "--out", str(out), *flags],
                       check=True, env=_env(), stdout=subprocess.DEVNULL)
    return out


def real_passages(workdir: Path) -> tuple[list[str], list[str], list[str]]:
    """Every window of the real corpora: (ids, titles, texts)."""
    from ragkit.evaluation import PassageLookup

    ids, titles, texts = [], [], []
    for name, inputs in SOURCES.items():
        lookup = PassageLookup.open(_ingest(inputs, workdir / f"bench_encode_{name}", "--window", str(WINDOW)))
        rows = np.arange(len(lookup))
        ids += [f"{name}:{pid}" for pid in lookup.ids_at(rows)]
        titles += lookup.titles_at(rows)
        texts += lookup.texts_at(rows)
    return ids, titles, texts


def real_questions(workdir: Path, count: int) -> list[str]:
    from ragkit.evaluation import load_questions

    questions = load_questions(workdir / "bench_encode_amazon", "train")
    return list(questions[: min(count, len(questions))]["question"])


def st_strings(titles: list[str], texts: list[str]) -> list[str]:
    """What sentence-transformers is given: one string the tokenizer reads as ``[CLS] title [SEP] text [SEP]``."""
    return [f"{title} [SEP] {text}" for title, text in zip(titles, texts)]


def same_tokens(tokenizer, titles: list[str], texts: list[str], max_length: int) -> np.ndarray:
    """Rows that ragkit's pair tokenisation and sentence-transformers' single string turn into the same ids
    (they differ only where truncation trims a title longer than its text: ragkit trims the longer part)."""
    ours = tokenizer(titles, texts, truncation="longest_first", max_length=max_length)["input_ids"]
    theirs = tokenizer(st_strings(titles, texts), truncation=True, max_length=max_length)["input_ids"]
    return np.array([a == b for a, b in zip(ours, theirs)])


# --- 1. encoding -------------------------------------------------------------------------------------------


def bench_encode(args, model, tokenizer, ids, titles, texts) -> np.ndarray:
    import torch
    from sentence_transformers import SentenceTransformer

    from ragkit.indexing.encode import PassageTexts, encode_passages, open_embeddings
    from ragkit.retriever.encoder import resolve_model_path

    st = SentenceTransformer(resolve_model_path("minilm"), device="cpu")
    st.max_seq_length = args.max_length
    st_inputs = st_strings(titles, texts)

    tokens = np.array([len(row) for row in tokenizer(titles, texts, truncation="longest_first",
                                                     max_length=args.max_length)["input_ids"]])
    print(f"{len(texts):,} passages ({WINDOW}-word windows of SciFact abstracts and Amazon reviews), max length "
          f"{args.max_length}, batch {args.batch_size}, {torch.get_num_threads()} thread(s); tokens per passage "
          f"mean {tokens.mean():.0f}, {np.mean(tokens == args.max_length):.0%} truncated")

    n, d = len(texts), model.embedding_dim
    vectors = {name: np.empty((n, d), dtype=np.float32) for name in ("ragkit-bf16", "ragkit-fp32", "st-fp32")}
    seconds = dict.fromkeys(vectors, 0.0)

    def run(name: str, lo: int, hi: int, out: Path) -> None:
        started = time.perf_counter()
        if name == "st-fp32":
            result = st.encode(st_inputs[lo:hi], batch_size=args.batch_size, convert_to_numpy=True)
        else:
            dtype = torch.bfloat16 if name == "ragkit-bf16" else None
            encode_passages(model, tokenizer, PassageTexts(ids[lo:hi], titles[lo:hi], texts[lo:hi]), out,
                            args.max_length, batch_size=args.batch_size, autocast_dtype=dtype)
            result = np.array(open_embeddings(out))
        seconds[name] += time.perf_counter() - started
        vectors[name][lo:hi] = result

    names = list(vectors)
    bounds = np.linspace(0, n, args.rounds + 1).astype(int)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run("ragkit-bf16", 0, min(n, 2 * args.batch_size), Path(tmp) / "warmup")  # first-call costs
        run("st-fp32", 0, min(n, 2 * args.batch_size), Path(tmp) / "warmup")
        seconds.update(dict.fromkeys(seconds, 0.0))
        for turn, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            order = names[turn % 3:] + names[: turn % 3]
            for name in order:
                run(name, int(lo), int(hi), Path(tmp) / name)
            print(f"  chunk {turn + 1}/{args.rounds} ({hi - lo:,} passages): order {' '.join(order)}", flush=True)

    rate = {name: n / seconds[name] for name in names}
    print(f"{'encoder':<14}{'seconds':>9}{'passages/s':>12}{'cos min':>10}{'cos mean':>10}   (cosine to st-fp32, per passage)")
    for name in names:
        cosine = np.sum(vectors[name] * vectors["st-fp32"], axis=1) / (
            np.linalg.norm(vectors[name], axis=1) * np.linalg.norm(vectors["st-fp32"], axis=1))
        print(f"{name:<14}{seconds[name]:>9.1f}{rate[name]:>12.1f}{cosine.min():>10.6f}{cosine.mean():>10.6f}")
    print(f"passages/s, ragkit bf16 / sentence-transformers fp32: {rate['ragkit-bf16'] / rate['st-fp32']:.2f}x (target >= 2)")
    print(f"passages/s, ragkit fp32 / sentence-transformers fp32: {rate['ragkit-fp32'] / rate['st-fp32']:.2f}x (target >= 1.0)")
    return vectors["ragkit-bf16"]


# --- 2. FAISS ----------------------------------------------------------------------------------------------


def noisy_corpus(base: np.ndarray, rows: int, sigma: float, seed: int) -> np.ndarray:
    """``base`` ``(n, D)`` followed by noisy, re-normalised copies of its rows, ``rows`` rows in all."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, base.shape[1]), dtype=np.float32)  # (rows, D)
    out[: len(base)] = base
    for start in range(len(base), rows, 65_536):
        stop = min(rows, start + 65_536)
        block = base[np.arange(start, stop) % len(base)] + sigma * rng.standard_normal((stop - start, base.shape[1]),
                                                                                        dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bench_faiss(args, model, tokenizer, base: np.ndarray) -> None:
    import torch

    from ragkit.indexing.encode import encode_queries
    from ragkit.indexing.faiss_index import build_index

    corpus = noisy_corpus(base, args.vectors, args.sigma, seed=0)
    queries = encode_queries(model, tokenizer, real_questions(args.workdir, args.queries), 64,
                             autocast_dtype=torch.bfloat16)  # (Q, D)
    labels = np.arange(len(corpus))
    print(f"\n{len(corpus):,} x {corpus.shape[1]} vectors ({len(base):,} real passage vectors + noisy copies, "
          f"sigma {args.sigma} per dimension, re-normalised), {len(queries):,} real SQuADShifts questions, top-{K}")
    print(f"{'index':<16}{'search':>14}{'build s':>9}{'queries/s':>11}{'recall@100':>12}{'x Flat q/s':>12}")
    exact = None
    flat_qps = None
    kinds = [("Flat", [{}]), ("HNSW32", [{"ef_search": ef} for ef in (128, 256)]),
             ("IVF1024,Flat", [{"nprobe": p} for p in (8, 16, 32)])]
    for factory, settings in kinds:
        started = time.perf_counter()
        index, _ = build_index(factory, corpus, labels, "dot", seed=0)
        built = time.perf_counter() - started
        for params in settings:
            index.search(queries[:10], K, **params)  # warm up
            started = time.perf_counter()
            _, found = index.search(queries, K, **params)  # (Q, K)
            qps = len(queries) / (time.perf_counter() - started)
            if exact is None:
                exact, flat_qps = found, qps
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)])
            label = ", ".join(f"{key.replace('_s', 'S')} {value}" for key, value in params.items()) or "exact"
            print(f"{factory:<16}{label:>14}{built:>9.1f}{qps:>11.0f}{recall:>12.3f}{qps / flat_qps:>11.1f}x", flush=True)
        del index


# --- 3. memory ---------------------------------------------------------------------------------------------


def rss_child(ingest_dir: str, max_length: int, batch_size: int) -> None:
    """Encode every passage of ``ingest_dir`` into a temporary directory; print a JSON line with peak RSS."""
    import torch

    from ragkit.evaluation import PassageLookup
    from ragkit.indexing.encode import LookupPassages, encode_passages
    from ragkit.retriever.encoder import BiEncoder, load_tokenizer

    model, tokenizer = BiEncoder.from_pretrained("minilm"), load_tokenizer("minilm")
    passages = LookupPassages(PassageLookup.open(ingest_dir))
    loaded, loaded_anon = _status_mb("VmRSS"), _status_mb("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS, so loading's peak is not counted
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:  # the kernel keeps no peak per kind: anonymous (heap) vs file-backed (memory maps)
        while not done.wait(0.05):
            for field in peaks:
                peaks[field] = max(peaks[field], _status_mb(field))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(ingest_dir).parent) as tmp:
        encode_passages(model, tokenizer, passages, tmp, max_length, batch_size=batch_size,
                        autocast_dtype=torch.bfloat16)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    print(json.dumps({"passages": len(passages), "seconds": seconds, "loaded_mb": loaded,
                      "loaded_anon_mb": loaded_anon, "peak_mb": _status_mb("VmHWM"),
                      "peak_anon_mb": peaks["RssAnon"], "peak_file_mb": peaks["RssFile"]}))


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak since start or reset) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def bench_rss(args, ids, titles, texts) -> None:
    results = []
    for size in args.rss_sizes:
        ingest_dir = args.workdir / f"bench_encode_rss_{size}"
        if not (ingest_dir / "manifest.json").is_file():
            source = args.workdir / f"bench_encode_rss_{size}.jsonl"
            with open(source, "w", encoding="utf-8") as handle:
                for i in range(size):
                    j = i % len(texts)
                    handle.write(json.dumps({"id": f"{i}-{ids[j]}", "title": titles[j], "text": texts[j]}) + "\n")
            _ingest([source], ingest_dir, "--window", "0")
            source.unlink()
        child = subprocess.run([sys.executable, __file__, "--rss-child", str(ingest_dir), "--max-length",
                                str(args.rss_max_length), "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                               check=True, env=_env(), capture_output=True, text=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"\nencode_passages (bf16, max length {args.rss_max_length}, batch {args.batch_size}) of an ingest artifact, "
          f"the {len(texts):,} real windows repeated under new ids; a fresh process per size")
    for row in results:
        print(f"{row['passages']:>10,} passages: {row['seconds']:7.1f} s, {row['passages'] / row['seconds']:7.0f} passages/s, "
              f"peak RSS {row['peak_mb']:7.1f} MiB = anonymous {row['peak_anon_mb']:7.1f} + file-backed (memory maps) "
              f"{row['peak_file_mb']:6.1f}; after loading the model {row['loaded_mb']:.1f} (anonymous {row['loaded_anon_mb']:.1f})")
    first, last = results[0], results[-1]
    scale = f"for {last['passages'] / first['passages']:.0f}x the passages (target close to 1)"
    print(f"peak RSS ({last['passages']:,}) / ({first['passages']:,}) = {last['peak_mb'] / first['peak_mb']:.2f}; "
          f"anonymous (heap) memory {last['peak_anon_mb'] / first['peak_anon_mb']:.2f} {scale}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=20_000, help="Real passages encoded by each encoder.")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="Chunks the encoders take turns on.")
    parser.add_argument("--faiss-passages", type=int, default=20_000, help="Real passage vectors in the FAISS corpus.")
    parser.add_argument("--vectors", type=int, default=200_000, help="Rows of the FAISS corpus.")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.015, help="Noise per dimension of the repeated rows.")
    parser.add_argument("--rss-sizes", default="20000,200000")
    parser.add_argument("--rss-max-length", type=int, default=32)
    parser.add_argument("--parts", default="encode,faiss,rss")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.max_length, args.batch_size)
        return
    args.rss_sizes = [int(size) for size in args.rss_sizes.split(",")]
    parts = set(args.parts.split(","))

    from transformers.utils import logging as transformers_logging

    from ragkit.retriever.encoder import BiEncoder, load_tokenizer

    transformers_logging.disable_progress_bar()
    ids, titles, texts = real_passages(args.workdir)
    if parts & {"encode", "faiss"}:
        import torch

        from ragkit.indexing.encode import PassageTexts, encode_passages, open_embeddings

        model, tokenizer = BiEncoder.from_pretrained("minilm"), load_tokenizer("minilm")
        same = same_tokens(tokenizer, titles, texts, args.max_length)
        print(f"identical token ids for ragkit and sentence-transformers: {same.sum():,} of {len(texts):,} windows; "
              f"the {len(texts) - same.sum():,} others (a title longer than its text) are left out")
        rows = np.random.default_rng(0).permutation(np.flatnonzero(same))
        sample = rows[: args.passages]
        base = bench_encode(args, model, tokenizer, [ids[i] for i in sample], [titles[i] for i in sample],
                            [texts[i] for i in sample])
        if "faiss" in parts:
            extra = rows[len(sample) : args.faiss_passages]  # more real windows for the FAISS corpus, bf16
            if len(extra):
                with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                    encode_passages(model, tokenizer, PassageTexts([ids[i] for i in extra], [titles[i] for i in extra],
                                                                   [texts[i] for i in extra]),
                                    tmp, args.max_length, batch_size=args.batch_size, autocast_dtype=torch.bfloat16)
                    base = np.concatenate([base, open_embeddings(tmp)])
            bench_faiss(args, model, tokenizer, base[: args.faiss_passages])
    if "rss" in parts:
        bench_rss(args, ids, titles, texts)


if __name__ == "__main__":
    main()
