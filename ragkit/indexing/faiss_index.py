"""A small FAISS wrapper: any ``index_factory`` string, inner product, ids that survive updates.

- **Metric**: always inner product. A retriever scoring by dot product searches its vectors as they are;
  one scoring by cosine has passages and queries L2-normalised here, so the inner product is the cosine.
- **Labels**: every vector carries an int64 label (its row in the version's embeddings, see
  :mod:`ragkit.indexing.versions`). IVF indexes store labels natively; every other kind is wrapped in an
  ``IndexIDMap``, so vectors can be removed and added by label without renumbering.
- **Training** (IVF, PQ, ...): on a seeded random sample of ``train_sample`` rows, read from the
  memory-mapped embeddings; vectors are then added a block at a time.
- **Search parameters** are set per search: ``nprobe`` (IVF lists visited) and ``efSearch`` (HNSW beam).
  FAISS does not raise ``efSearch`` to ``k`` by itself, and a beam narrower than ``k`` silently loses
  results, so it is raised here.
- **Deletion**: kinds that cannot remove vectors (HNSW) report it, and the caller rebuilds them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import RagkitError

ADD_ROWS = 65_536
"""Vectors converted to float32 and added per step (bounds the memory of adding a memory-mapped matrix)."""
FACTORY_EXAMPLES = "Flat, HNSW32, IVF4096,Flat, IVF4096,PQ64"


def _faiss():
    import faiss

    return faiss


def _reason(exc: Exception) -> str:
    """The readable part of a FAISS error ("Error in ... at file:line: Error: 'cond' failed: reason")."""
    text = " ".join(str(exc).split())
    for marker in ("failed: ", ": Error: ", "): "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    return re.sub(r"^Error in .*? at \S+: ", "", text)


class FaissIndex:
    """A FAISS index over labelled vectors, with the similarity it was built for."""

    def __init__(self, index, similarity: str, factory: str) -> None:
        if similarity not in ("dot", "cos"):
            raise RagkitError(f"similarity={similarity!r} is not one of dot, cos")
        self.index = index
        self.similarity = similarity
        self.factory = factory

    @classmethod
    def create(cls, factory: str, dimension: int, similarity: str) -> "FaissIndex":
        """An empty index from a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF4096,PQ64``, ...)."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(int(dimension), str(factory), faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise RagkitError(
                f"index factory {factory!r} is not one FAISS builds for {dimension}-dimensional vectors "
                f"({_reason(exc)}); examples: {FACTORY_EXAMPLES}"
            ) from None
        # index_factory returns the concrete class, owned by Python; IndexIDMap keeps a reference to it.
        if not isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap)):
            index = faiss.IndexIDMap(index)
        return cls(index, similarity, factory)

    # --- building ----------------------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """float32, contiguous, normalised for cosine: ``(n, D)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.similarity == "cos":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (n, 1)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    def train(self, embeddings: np.ndarray, rows: np.ndarray | None = None, sample: int = 262_144, seed: int = 0) -> int:
        """Train on a seeded random sample of at most ``sample`` of ``rows`` (default: all rows) of
        ``embeddings`` ``(P, D)``; returns the number of vectors trained on (0 when no training is needed)."""
        if not self.needs_training:
            return 0
        rows = np.arange(len(embeddings)) if rows is None else np.asarray(rows)
        if len(rows) > sample:
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
        try:
            self.index.train(self._prepare(embeddings[rows]))
        except RuntimeError as exc:
            raise RagkitError(
                f"cannot train index {self.factory!r} on {len(rows)} vectors ({_reason(exc)}); "
                f"use fewer lists / centroids, a larger --train-sample, or Flat / HNSW32"
            ) from None
        return len(rows)

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Add ``vectors`` ``(n, D)`` under int64 ``labels`` ``(n,)``, a block at a time."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(labels) != len(vectors):
            raise ValueError(f"{len(labels)} labels for {len(vectors)} vectors")
        for start in range(0, len(labels), ADD_ROWS):
            block = self._prepare(vectors[start : start + ADD_ROWS])
            self.index.add_with_ids(block, labels[start : start + ADD_ROWS])

    def remove(self, labels: np.ndarray) -> bool:
        """Remove the vectors of ``labels``; False (nothing removed) when this kind of index cannot delete."""
        faiss = _faiss()
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64)))
        except RuntimeError:
            return False
        return True

    # --- searching ---------------------------------------------------------------------------------------

    def set_search_parameters(self, k: int, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists to visit (at most all of them) and HNSW beam width (never below ``k``)."""
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and nprobe:
            ivf.nprobe = min(int(nprobe), ivf.nlist)
        inner = self.index
        while isinstance(inner, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(int(ef_search or 0), int(k))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query ``(Q, D)`` -> scores ``(Q, k)`` float32 and labels ``(Q, k)`` int64, best first.

        Where fewer than ``k`` vectors are found the row ends with label -1 (and score -inf or FAISS's filler).
        """
        self.set_search_parameters(k, nprobe, ef_search)
        if len(queries) == 0:
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        scores, labels = self.index.search(self._prepare(queries), int(k))
        return scores, labels

    # --- files -------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, similarity: str, factory: str) -> "FaissIndex":
        path = Path(path)
        if not path.is_file():
            raise RagkitError(f"{path}: missing FAISS index (rebuild the index)")
        try:
            index = _faiss().read_index(str(path))
        except RuntimeError as exc:
            raise RagkitError(f"{path}: unreadable FAISS index ({_reason(exc)}); rebuild the index") from None
        return cls(index, similarity, factory)


def build_index(factory: str, embeddings: np.ndarray, labels: np.ndarray, similarity: str, train_sample: int = 262_144,
                seed: int = 0, rows: np.ndarray | None = None) -> tuple[FaissIndex, int]:
    """An index of ``embeddings[rows]`` (default: every row) labelled ``labels`` (one per row used), trained
    first when the kind needs it. Returns the index and the number of vectors it was trained on."""
    index = FaissIndex.create(factory, embeddings.shape[1], similarity)
    every_row = rows is None
    rows = np.arange(len(embeddings)) if every_row else np.asarray(rows, dtype=np.int64)
    trained = index.train(embeddings, rows, train_sample, seed)
    if every_row:
        index.add(embeddings, labels)
    else:
        for start in range(0, len(rows), ADD_ROWS):
            index.add(embeddings[rows[start : start + ADD_ROWS]], labels[start : start + ADD_ROWS])
    return index, trained
