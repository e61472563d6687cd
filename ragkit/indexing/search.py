"""Dense search: encode queries (through :mod:`ragkit.indexing.encode`), search a FAISS index, map rows to ids.

:class:`DenseSearcher` serves one version of an index artifact. :meth:`DenseSearcher.open` loads the
version (by default the ``current`` one) and the encoder that built it, refusing another encoder (its
query fingerprint differs) or one of another dimension. :func:`write_run` writes the TREC run of a
questions split, the format ``ragkit evaluate`` scores.

Example::

    from ragkit.indexing.search import DenseSearcher
    searcher = DenseSearcher.open("work/scifact-index")
    hits = searcher.search(["0-dimensional biomaterials show inductive properties."], k=10)[0]
    print(hits.passage_ids[:3], hits.scores[:3])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..artifacts import read_upstream
from ..runs import TrecWriter
from .encode import encode_queries, resolve_device, resolve_precision
from .faiss_index import FaissIndex
from .fingerprint import EncoderSettings, load_encoder
from .versions import IndexVersion

RUN_TAG = "ragkit-dense"
QUERY_CHUNK = 4096
"""Questions encoded and searched per step when writing a run."""


class Hits(NamedTuple):
    """One query's results, best first."""

    passage_ids: list[str]
    scores: list[float]


class DenseSearcher:
    """Queries -> top-k passage ids and scores over one index version."""

    def __init__(self, model: Any, tokenizer: Any, settings: EncoderSettings, index: FaissIndex, ids: Sequence[str], *,
                 autocast_dtype: Any = None, batch_size: int = 128, nprobe: int | None = None,
                 ef_search: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.index = index
        self.ids = ids
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        self.nprobe = nprobe
        self.ef_search = ef_search

    @classmethod
    def open(cls, artifact: str | Path, version: str | None = None, model: str | None = None, device: str = "auto",
             precision: str = "auto", batch_size: int = 128, nprobe: int | None = None,
             ef_search: int | None = None) -> "DenseSearcher":
        """Load ``version`` (default: current) of an index artifact with the encoder that built it.

        ``model`` names another copy of that encoder; one whose query tower differs is refused.
        ``nprobe`` / ``ef_search`` default to the settings the index was built with.
        """
        manifest = read_upstream(artifact, "index")
        index_version = IndexVersion.open(artifact, version)
        built = index_version.encoder
        encoder, tokenizer, settings = load_encoder(model or built.path, built.similarity, built.query_max_length,
                                                    built.passage_max_length)
        settings.check_queries(built, index_version.path)
        torch_device = resolve_device(device)
        encoder.to(torch_device)
        return cls(encoder, tokenizer, settings, index_version.load_index(), index_version.ids(),
                   autocast_dtype=resolve_precision(precision, torch_device), batch_size=batch_size,
                   nprobe=nprobe or manifest.config.get("nprobe"), ef_search=ef_search or manifest.config.get("ef_search"))

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """Query vectors ``(Q, D)``."""
        return encode_queries(self.model, self.tokenizer, queries, self.settings.query_max_length,
                              batch_size=self.batch_size, autocast_dtype=self.autocast_dtype)

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """The top ``k`` passages of each query."""
        return self.search_vectors(self.encode(queries), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[Hits]:
        """The top ``k`` passages of each query vector ``(Q, D)``."""
        k = min(int(k), len(self.index))
        scores, labels = self.index.search(vectors, k, nprobe=self.nprobe, ef_search=self.ef_search)  # (Q, k), (Q, k)
        hits = []
        for row_scores, row_labels in zip(scores.tolist(), labels.tolist()):
            found = [(self.ids[label], score) for label, score in zip(row_labels, row_scores) if label >= 0]
            hits.append(Hits([pid for pid, _ in found], [score for _, score in found]))
        return hits


def write_run(searcher: DenseSearcher, questions: Any, path: str | Path, depth: int, tag: str = RUN_TAG,
              progress: Any = None) -> int:
    """Search every question of a questions dataset (columns ``id``, ``question``) and write the TREC run.

    Returns the number of questions written.
    """
    with TrecWriter(path, tag) as writer:
        for start in range(0, len(questions), QUERY_CHUNK):
            chunk = questions[start : start + QUERY_CHUNK]
            for question_id, hits in zip(chunk["id"], searcher.search(chunk["question"], depth)):
                writer.write(question_id, hits.passage_ids, hits.scores)
            if progress is not None:
                progress.update(len(chunk["id"]))
    return len(questions)
