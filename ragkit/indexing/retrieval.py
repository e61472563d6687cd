"""Passages for questions from one index version: dense, BM25 or hybrid retrieval, with their texts.

:class:`PassageRetriever` is what the reader and the server retrieve with. It holds one version of an
index artifact (its FAISS index, its passage vectors and its passage texts), the query tower that
searches it, and optionally the BM25 index of a ``mine`` artifact made from the same ingest artifact:

* ``dense``: the query tower's vectors searched in FAISS (:class:`~ragkit.indexing.search.DenseSearcher`);
* ``bm25``: the mine artifact's BM25 index (passages deleted in this version are skipped; passages added
  by ``ragkit index update`` are not in it, and a replaced passage is found by its old text);
* ``hybrid``: ``dense + alpha * bm25`` over the union of both top-``depth`` lists
  (:func:`~ragkit.indexing.fusion.fuse_linear`), with the alpha ``ragkit hybrid`` tuned or one given.

Each :class:`Retrieved` carries the rows of its passages' vectors in the version, so a reader can score
them with a query vector that carries a gradient (:meth:`PassageRetriever.passage_vectors`): the
passage vectors themselves are fixed.

The query tower may differ from the one that built the index (a reader trains its own); it must make
vectors of the same dimension, and :meth:`PassageRetriever.open` checks that the index's passage tower is
the one the query tower was trained against (``passage_fingerprint``).

Example::

    from ragkit.indexing.retrieval import PassageRetriever
    retriever = PassageRetriever.open("work/index", mode="hybrid", mine="work/mine", alpha="work/hybrid")
    found = retriever.retrieve(["who wrote the review?"], k=5)[0]
    print(found.passage_ids, found.scores)
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifacts import read_upstream
from ..errors import RagkitError
from ..evaluation import PassageLookup, find_ingest
from ..runs import Ranking
from .encode import resolve_device, resolve_precision
from .fingerprint import EncoderSettings, load_encoder
from .fusion import fuse_linear
from .search import DenseSearcher
from .versions import IndexVersion, VersionPassages

MODES: tuple[str, ...] = ("dense", "bm25", "hybrid")
FUSION_DEPTH = 100
"""Each list's depth before a hybrid fusion (``ragkit hybrid``'s default, the depth alpha is tuned at)."""


@dataclasses.dataclass
class Retrieved:
    """One question's passages, best first."""

    passage_ids: list[str]
    titles: list[str]
    texts: list[str]
    scores: list[float]
    """The ranking's own scores: ``q.d`` (dense), BM25, or the fused score (hybrid)."""
    rows: np.ndarray
    """(K,) int64: each passage's row among the version's vectors."""

    def __len__(self) -> int:
        return len(self.passage_ids)

    def passages(self) -> list[dict[str, str]]:
        """``{"id", "title", "text"}`` of each passage, as readers take them."""
        return [{"id": p, "title": t, "text": x} for p, t, x in zip(self.passage_ids, self.titles, self.texts)]


def read_alpha(value: float | str | Path | None) -> tuple[float, bool]:
    """A hybrid's weight of BM25: a number, or the ``alpha_used`` of a ``ragkit hybrid`` artifact; and
    whether that hybrid min-max normalised the scores."""
    if value is None:
        raise RagkitError("hybrid retrieval needs alpha: pass --alpha with a number or a `ragkit hybrid` artifact")
    try:
        return float(value), False
    except (TypeError, ValueError):
        pass
    manifest = read_upstream(value, "hybrid")
    alpha = manifest.config.get("alpha_used")
    if manifest.config.get("method") != "linear" or alpha is None:
        raise RagkitError(f"{value}: fused its runs with {manifest.config.get('method')} fusion, not linear (pass --alpha with a number)")
    return float(alpha), bool(manifest.config.get("normalize", False))


class PassageRetriever:
    """Questions -> top-k passages of one index version (see the module docstring)."""

    def __init__(self, version: IndexVersion, searcher: DenseSearcher, passages: VersionPassages, *, mode: str = "dense",
                 bm25: Any = None, bm25_lookup: PassageLookup | None = None, alpha: float | None = None,
                 normalize: bool = False, source: str = "index") -> None:
        check_mode(mode, bm25, alpha)
        self.version = version
        self.searcher = searcher
        self.passages = passages
        self.mode = mode
        self.bm25 = bm25
        self.bm25_lookup = bm25_lookup
        self.alpha = alpha
        self.normalize = normalize
        self.source = source
        self.embeddings = version.embeddings()
        ids = version.ids()
        live = version.live()
        self.row_of: dict[str, int] = {ids[row]: int(row) for row in np.flatnonzero(live)}

    @classmethod
    def open(cls, index: str | Path, version: str | None = None, *, mode: str = "dense", query_model: Any = None,
             mine: str | Path | None = None, alpha: float | str | Path | None = None, device: str = "auto",
             precision: str = "auto", batch_size: int = 128) -> "PassageRetriever":
        """Version ``version`` (default: current) of an index artifact.

        ``query_model``: None (the encoder that built the index), a model directory / alias whose query
        tower must match the index's (its query fingerprint), or a loaded ``(encoder, tokenizer,
        settings)`` whose passage fingerprint must match (a reader's own trained query tower).
        ``mine``: the mine artifact whose BM25 index serves ``bm25`` and ``hybrid``; ``alpha``: the
        hybrid's weight, a number or a ``ragkit hybrid`` artifact.
        """
        manifest = read_upstream(index, "index")
        index_version = IndexVersion.open(index, version)
        built = index_version.encoder
        if isinstance(query_model, tuple):
            encoder, tokenizer, settings = query_model
            check_passage_tower(settings, built, index_version.path)
        else:
            encoder, tokenizer, settings = load_encoder(query_model or built.path, built.similarity,
                                                        built.query_max_length, built.passage_max_length)
            settings.check_queries(built, index_version.path)
        torch_device = resolve_device(device)
        encoder.to(torch_device)
        searcher = DenseSearcher(encoder, tokenizer, settings, index_version.load_index(), index_version.ids(),
                                 autocast_dtype=resolve_precision(precision, torch_device), batch_size=batch_size,
                                 nprobe=manifest.config.get("nprobe"), ef_search=manifest.config.get("ef_search"))
        ingest_dir = find_ingest(manifest)
        bm25 = lookup = None
        if mode != "dense" and mine is not None:
            bm25, lookup = open_bm25(mine, ingest_dir)
        weight, normalize = read_alpha(alpha) if mode == "hybrid" else (None, False)
        return cls(index_version, searcher, VersionPassages(index_version, ingest_dir), mode=mode, bm25=bm25,
                   bm25_lookup=lookup, alpha=weight, normalize=normalize, source=str(index))

    def with_mode(self, mode: str, *, bm25: Any = None, bm25_lookup: PassageLookup | None = None,
                  alpha: float | None = None, normalize: bool = False) -> "PassageRetriever":
        """This version's retriever in another mode, sharing its index, query tower, vectors and passages
        (nothing is loaded again); ``bm25`` / ``bm25_lookup`` from :func:`open_bm25`, ``alpha`` /
        ``normalize`` from :func:`read_alpha`, default this retriever's own."""
        bm25 = self.bm25 if bm25 is None else bm25
        alpha = self.alpha if alpha is None else alpha
        check_mode(mode, bm25, alpha)
        other = copy.copy(self)
        other.mode, other.bm25, other.alpha = mode, bm25, alpha
        other.bm25_lookup = self.bm25_lookup if bm25_lookup is None else bm25_lookup
        other.normalize = normalize or self.normalize
        return other

    @property
    def dimension(self) -> int:
        return self.embeddings.dimension

    def __len__(self) -> int:
        """Live passages in this version."""
        return len(self.row_of)

    def encode(self, questions: Sequence[str]) -> np.ndarray:
        """Query vectors ``(Q, D)`` of the query tower (no gradient)."""
        return self.searcher.encode(questions)

    def passage_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The fixed passage vectors of version rows ``rows`` ``(...,)`` -> ``(..., D)`` float32."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.embeddings[rows.reshape(-1)].reshape(*rows.shape, self.dimension)

    def retrieve(self, questions: Sequence[str], k: int, query_vectors: np.ndarray | None = None) -> list[Retrieved]:
        """The top ``k`` passages of each question by this retriever's mode.

        ``query_vectors`` ``(Q, D)``: the questions' vectors when the caller already has them (dense and
        hybrid modes; they are encoded otherwise).
        """
        k = int(k)
        if k < 1:
            raise RagkitError(f"k={k} must be >= 1")
        if k > len(self):
            raise RagkitError(f"{self.source}: asked for {k} passages per question, version {self.version.name} holds {len(self)} (lower --n-docs)")
        questions = list(questions)
        dense = sparse = None
        if self.mode in ("dense", "hybrid"):
            vectors = self.encode(questions) if query_vectors is None else query_vectors
            depth = k if self.mode == "dense" else max(k, FUSION_DEPTH)
            dense = [Ranking("", hits.passage_ids, hits.scores) for hits in self.searcher.search_vectors(vectors, depth)]
        if self.mode in ("bm25", "hybrid"):
            sparse = self._bm25(questions, k if self.mode == "bm25" else max(k, FUSION_DEPTH))
        if self.mode == "dense":
            rankings = dense
        elif self.mode == "bm25":
            rankings = sparse
        else:
            rankings = [fuse_linear(d, s, self.alpha, k, self.normalize) for d, s in zip(dense, sparse)]
        return [self._found(ranking, k) for ranking in rankings]

    def _bm25(self, questions: list[str], depth: int) -> list[Ranking]:
        """BM25's top ``depth`` among this version's live passages."""
        extra = len(self.passages.deleted)
        rows, scores = self.bm25.search(questions, min(depth + extra, self.bm25.num_passages))  # (Q, n), (Q, n)
        rankings = []
        for row_list, score_list in zip(rows.tolist(), scores.tolist()):
            found = [(r, s) for r, s in zip(row_list, score_list) if r >= 0]
            ids = self.bm25_lookup.ids_at([r for r, _ in found])
            kept = [(pid, s) for pid, (_, s) in zip(ids, found) if pid in self.row_of][:depth]
            rankings.append(Ranking("", [pid for pid, _ in kept], [float(s) for _, s in kept]))
        return rankings

    def _found(self, ranking: Ranking, k: int) -> Retrieved:
        ids = list(ranking.passage_ids[:k])
        rows = [self.passages.get(pid) for pid in ids]
        return Retrieved(ids, [r["title"] for r in rows], [r["text"] for r in rows], list(ranking.scores[:k]),
                         np.array([self.row_of[pid] for pid in ids], dtype=np.int64))


def check_mode(mode: str, bm25: Any, alpha: float | None) -> None:
    """Refuse a retrieval mode that lacks its BM25 index or its hybrid weight."""
    if mode not in MODES:
        raise RagkitError(f"retrieval={mode!r} is not one of {', '.join(MODES)}")
    if mode != "dense" and bm25 is None:
        raise RagkitError(f"{mode} retrieval needs a BM25 index: pass --bm25 with the `ragkit mine` artifact of the index's ingest artifact")
    if mode == "hybrid" and alpha is None:
        raise RagkitError("hybrid retrieval needs alpha: pass --alpha with a number or a `ragkit hybrid` artifact")


def open_bm25(mine: str | Path, ingest_dir: Path) -> tuple[Any, PassageLookup]:
    """The BM25 index of a mine artifact made from ``ingest_dir``, and that artifact's passages by row."""
    from ..bm25 import BM25Index

    manifest = read_upstream(mine, "mine")
    mined_from = manifest.upstream("ingest")
    if Path(mined_from).resolve() != Path(ingest_dir).resolve():
        raise RagkitError(f"{mine}: was mined from {mined_from}, the index from {ingest_dir} (pass the mine artifact of the index's ingest artifact)")
    return BM25Index.load(Path(mine) / "bm25"), PassageLookup.open(ingest_dir)


def check_passage_tower(settings: EncoderSettings, built: EncoderSettings, source: str | Path) -> None:
    """Refuse a query tower trained against another passage tower than the one that built an index."""
    if settings.dimension != built.dimension:
        raise RagkitError(
            f"{source}: holds {built.dimension}-dimensional vectors, the query tower {settings.model} makes "
            f"{settings.dimension} (use the index its reader was trained with)"
        )
    if settings.passage_fingerprint != built.passage_fingerprint:
        raise RagkitError(
            f"{source}: was built by another passage encoder ({built.model}) than the one the query tower "
            f"{settings.model} was trained against; use the index its reader was trained with"
        )
