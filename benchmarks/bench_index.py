"""Memory of each FAISS index kind for 21M x 768 vectors, from measured bytes per vector.

Each kind is built (through ragkit's FAISS wrapper, so with the labels ragkit stores) at two sizes; the
difference of the serialised sizes divided by the difference of the vector counts is the exact cost of one
more vector, and the rest is the fixed part (centroids, codebooks). The 21M figure is fixed part (with the
centroids of 4096 lists where the kind has lists) + 21M x bytes per vector, printed beside the formula
the per-vector cost should match. Serialised size is what the index takes in memory once loaded, up to a
few allocator pages.

    python benchmarks/bench_index.py [--passages 21000000] [--dim 768]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragkit.indexing.faiss_index import build_index  # noqa: E402

GB = 1e9
SMALL, LARGE = 4_000, 12_000
LISTS_HERE, LISTS_THERE = 64, 4096


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(256, d)).astype(np.float32)
    return middles[rng.integers(256, size=n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)


def serialized_bytes(factory: str, vectors: np.ndarray) -> int:
    import faiss

    index, _ = build_index(factory, vectors, np.arange(len(vectors)), "dot", train_sample=4_000, seed=0)
    return int(faiss.serialize_index(index.index).size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=21_000_000)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    d, n = args.dim, args.passages
    vectors = clustered(LARGE, d, seed=0)
    # kind here (small lists) -> kind named in the table, and the per-vector formula it should meet
    kinds = [
        ("Flat", "Flat", 4 * d + 8, "4d + 8 (vector, label)"),
        ("HNSW32", "HNSW32", None, "4d + 8 + ~2*32*4 links + level data"),
        (f"IVF{LISTS_HERE},Flat", f"IVF{LISTS_THERE},Flat", 4 * d + 8, "4d + 8 (vector, id in its list)"),
        (f"IVF{LISTS_HERE},SQ8", f"IVF{LISTS_THERE},SQ8", d + 8, "d + 8 (8-bit scalar codes, id)"),
        (f"IVF{LISTS_HERE},PQ64", f"IVF{LISTS_THERE},PQ64", 64 + 8, "64 + 8 (PQ codes, id)"),
    ]
    centroid_bytes = 4 * d * (LISTS_THERE - LISTS_HERE)
    print(f"{n:,} x {d} vectors, inner product; measured at {SMALL:,} and {LARGE:,} vectors")
    print(f"{'index':<18}{'bytes/vector':>13}{'formula':>9}  {'fixed MB':>9}{'total GB':>10}  build s   formula")
    for here, there, formula, explained in kinds:
        started = time.perf_counter()
        small = serialized_bytes(here, vectors[:SMALL])
        large = serialized_bytes(here, vectors)
        per_vector = (large - small) / (LARGE - SMALL)
        fixed = small - per_vector * SMALL + (centroid_bytes if "IVF" in here else 0)
        total = fixed + per_vector * n
        expected = f"{formula}" if formula else "-"
        print(f"{there:<18}{per_vector:>13.1f}{expected:>9}  {fixed / 1e6:>9.1f}{total / GB:>10.2f}  "
              f"{time.perf_counter() - started:>7.1f}   {explained}")
    print(f"embeddings.npy  float32 {4 * d * n / GB:.2f} GB, float16 {2 * d * n / GB:.2f} GB (on disk, memory-mapped)")


if __name__ == "__main__":
    main()
