"""BM25 retrieval over passages: one tokenizer, two interchangeable backends.

Backends (``BM25Index.create(backend, ...)``):

- ``bm25s`` (default): scores are precomputed per (term, passage) into a sparse matrix, so a query is a sum
  of a few matrix columns followed by a top-k selection; the selection dominates, and it runs on
  ``threads`` threads. ``method`` picks the variant:

  - ``robertson``: idf = log((N - df + 0.5) / (df + 0.5)) floored at 0, term weight
    tf / (tf + k1 (1 - b + b dl / avgdl)). This is rank-bm25's ``BM25Okapi(epsilon=0)`` divided by the
    constant (k1 + 1), so the two rank passages identically.
  - ``lucene``: idf = log(1 + (N - df + 0.5) / (df + 0.5)) (never negative, so very common terms still
    count a little), same term weight. This is what Lucene/Anserini/pyserini compute.

- ``rank-bm25``: the reference implementation, ``rank_bm25.BM25Okapi`` with ``epsilon=0`` (its default
  0.25 replaces negative idf by a quarter of the mean idf instead of 0, which reorders ~20% of a top-100).
  It scores every passage in pure Python per query (a few queries/s on 100k passages): use it to check
  results, not to mine. Only ``robertson`` exists there.

Both backends see identical tokens from :class:`Tokenizer`: NFKC-normalised, lower-cased ``\\w+`` runs,
optionally without Lucene's 33 English stop words and optionally Snowball-stemmed (PyStemmer).

Passages that share no weighted term with a query score exactly 0; they are not results (their order
would be arbitrary), so ``search`` pads each row with index -1 / score 0 after the last positive score.
Within a row, equal scores are ordered by passage index, so results are deterministic.
"""

from __future__ import annotations

import json
import re
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import RagkitError

CONFIG = "config.json"
BACKENDS = ("bm25s", "rank-bm25")
METHODS = ("robertson", "lucene")

# Lucene's EnglishAnalyzer stop set (also Elasticsearch's `_english_` and bm25s' "en").
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)

_WORD = re.compile(r"\w+")


class Tokenizer:
    """Text -> BM25 terms: NFKC, lower-case, ``\\w+`` runs, optional stop words and stemming.

    Stemming uses PyStemmer's Snowball English stemmer; without the package installed it is refused
    instead of silently indexing unstemmed text.
    """

    def __init__(self, stopwords: bool = False, stem: bool = False) -> None:
        self.stopwords = bool(stopwords)
        self.stem = bool(stem)
        self._stop = ENGLISH_STOPWORDS if self.stopwords else None
        self._stemmer = None
        if self.stem:
            try:
                import Stemmer
            except ImportError:
                raise RagkitError("stemming needs the PyStemmer package (pip install PyStemmer), or drop --stem") from None
            self._stemmer = Stemmer.Stemmer("english")

    def __call__(self, text: str) -> list[str]:
        words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
        if self._stop is not None:
            words = [w for w in words if w not in self._stop]
        if self._stemmer is not None:
            words = self._stemmer.stemWords(words)
        return words

    def settings(self) -> dict[str, Any]:
        return {
            "normalization": "NFKC",
            "lowercase": True,
            "pattern": _WORD.pattern,
            "stopwords": "lucene-english" if self.stopwords else None,
            "stemmer": "snowball-english" if self.stem else None,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "Tokenizer":
        return cls(stopwords=settings.get("stopwords") is not None, stem=settings.get("stemmer") is not None)


class TokenizedCorpus:
    """Token ids of every passage, stored flat: passage i is ``ids[offsets[i]:offsets[i + 1]]``.

    Built from a stream of texts in chunks, so the corpus never exists as Python lists of strings
    (one million passages of 100 words is ~0.4 GB here instead of several GB).
    """

    def __init__(self, vocab: dict[str, int], ids: np.ndarray, offsets: np.ndarray) -> None:
        self.vocab = vocab
        self.ids = ids  # (total_tokens,) int32
        self.offsets = offsets  # (passages + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def build(cls, texts: Iterable[str], tokenizer: Tokenizer, chunk: int = 10_000, progress: Any = None) -> "TokenizedCorpus":
        vocab: dict[str, int] = {}
        id_chunks: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        batch: list[str] = []

        def flush() -> None:
            token_lists = [tokenizer(text) for text in batch]
            # setdefault with len(vocab) evaluated first gives a new term the next free id.
            flat = [vocab.setdefault(t, len(vocab)) for tokens in token_lists for t in tokens]
            id_chunks.append(np.asarray(flat, dtype=np.int32))
            lengths.append(np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists)))
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=np.int32)
        return cls(vocab, ids, offsets)

    def passage_ids(self) -> list[np.ndarray]:
        """One int32 view per passage (no copy)."""
        return np.split(self.ids, self.offsets[1:-1])

    def terms(self) -> list[str]:
        """Vocabulary as a list: ``terms()[i]`` is the term with id i."""
        terms = [""] * len(self.vocab)
        for term, i in self.vocab.items():
            terms[i] = term
        return terms

    def save(self, directory: Path) -> None:
        np.save(directory / "token_ids.npy", self.ids)
        np.save(directory / "token_offsets.npy", self.offsets)
        (directory / "vocab.json").write_text(json.dumps(self.terms(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "TokenizedCorpus":
        terms = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        ids = np.load(directory / "token_ids.npy")
        offsets = np.load(directory / "token_offsets.npy")
        return cls({t: i for i, t in enumerate(terms)}, ids, offsets)


def _order_rows(indices: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score (desc) then index (asc); blank out non-positive scores; keep k columns."""
    indices = indices.astype(np.int64, copy=False)  # (Q, k')
    scores = scores.astype(np.float32, copy=False)  # (Q, k')
    empty = scores <= 0
    keys_index = np.where(empty, np.iinfo(np.int64).max, indices)
    keys_score = np.where(empty, np.inf, -scores)
    order = np.lexsort((keys_index, keys_score), axis=-1)
    indices = np.take_along_axis(np.where(empty, -1, indices), order, axis=-1)
    scores = np.take_along_axis(np.where(empty, 0.0, scores).astype(np.float32), order, axis=-1)
    if indices.shape[1] < k:
        pad = k - indices.shape[1]
        indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=0.0)
    return indices, scores


class BM25Index(ABC):
    """A BM25 index over passages, addressed by row number (0..N-1 in indexing order).

    ``search(queries, k)`` returns ``(indices, scores)``, both of shape (len(queries), k): row numbers
    (-1 where there are fewer than k matching passages) and float32 scores, best first.
    """

    backend: str

    def __init__(self, tokenizer: Tokenizer, method: str = "robertson", k1: float = 1.5, b: float = 0.75, threads: int = 1) -> None:
        if method not in METHODS:
            raise RagkitError(f"BM25 method={method!r} is not one of {', '.join(map(repr, METHODS))}")
        if k1 < 0 or not 0 <= b <= 1:
            raise RagkitError(f"BM25 needs k1 >= 0 and 0 <= b <= 1 (got k1={k1}, b={b})")
        self.tokenizer = tokenizer
        self.method = method
        self.k1 = float(k1)
        self.b = float(b)
        self.threads = max(1, int(threads))
        self.num_passages = 0

    @staticmethod
    def create(backend: str, tokenizer: Tokenizer, method: str = "robertson", k1: float = 1.5, b: float = 0.75, threads: int = 1) -> "BM25Index":
        if backend == "bm25s":
            return Bm25sIndex(tokenizer, method, k1, b, threads)
        if backend == "rank-bm25":
            return RankBm25Index(tokenizer, method, k1, b, threads)
        raise RagkitError(f"BM25 backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")

    def settings(self) -> dict[str, Any]:
        """What built this index: backend, variant, parameters, tokenizer, size."""
        return {
            "backend": self.backend,
            "method": self.method,
            "k1": self.k1,
            "b": self.b,
            "tokenizer": self.tokenizer.settings(),
            "passages": self.num_passages,
        }

    def index(self, texts: Iterable[str], progress: Any = None) -> None:
        """Index passage texts streamed in row order (``progress``: an optional tqdm-like bar)."""
        corpus = TokenizedCorpus.build(texts, self.tokenizer, progress=progress)
        if len(corpus) == 0:
            raise RagkitError("BM25: no passages to index (the passages dataset is empty)")
        self.num_passages = len(corpus)
        self._build(corpus)

    @property
    @abstractmethod
    def vocabulary_size(self) -> int: ...

    @abstractmethod
    def _build(self, corpus: TokenizedCorpus) -> None: ...

    @abstractmethod
    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def _save_data(self, directory: Path) -> None: ...

    @abstractmethod
    def _load_data(self, directory: Path) -> None: ...

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the index and ``config.json`` (settings plus ``metadata``, e.g. what corpus it covers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_data(directory)
        (directory / CONFIG).write_text(json.dumps({**self.settings(), **(metadata or {})}, indent=2) + "\n", encoding="utf-8")

    @staticmethod
    def read_config(directory: str | Path) -> dict[str, Any]:
        target = Path(directory) / CONFIG
        try:
            return json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RagkitError(f"{directory}: not a saved BM25 index, it has no {CONFIG} (rebuild it with `ragkit mine`)") from None
        except json.JSONDecodeError as exc:
            raise RagkitError(f"{target}: unreadable ({exc}); rebuild the index with `ragkit mine --overwrite`") from None

    @staticmethod
    def load(directory: str | Path, threads: int = 1) -> "BM25Index":
        directory = Path(directory)
        config = BM25Index.read_config(directory)
        tokenizer = Tokenizer.from_settings(config["tokenizer"])
        index = BM25Index.create(config["backend"], tokenizer, config["method"], config["k1"], config["b"], threads)
        index._load_data(directory)
        index.num_passages = int(config["passages"])
        return index


class Bm25sIndex(BM25Index):
    """The ``bm25s`` backend (precomputed sparse score matrix; threaded top-k)."""

    backend = "bm25s"

    def _build(self, corpus: TokenizedCorpus) -> None:
        import bm25s

        self._model = bm25s.BM25(method=self.method, k1=self.k1, b=self.b)
        # A (token-id lists, vocab) tuple is bm25s' pre-tokenised input; numpy views keep it compact.
        self._model.index((corpus.passage_ids(), corpus.vocab), create_empty_token=False, show_progress=False)
        self._set_vocabulary()

    def _set_vocabulary(self) -> None:
        """Map terms to ids, leaving out terms that add nothing to any score.

        Under Robertson's idf a term in half the passages or more weighs exactly 0 everywhere; its posting
        list is the longest there is, so skipping it in queries saves most of the scoring time at no
        change in results.
        """
        data, indptr = self._model.scores["data"], np.asarray(self._model.scores["indptr"])
        starts, ends = indptr[:-1], indptr[1:]
        weighs = np.zeros(len(starts), dtype=bool)
        nonempty = ends > starts
        if nonempty.any():
            weighs[nonempty] = np.maximum.reduceat(np.asarray(data), starts[nonempty]) > 0
        self._vocab = {term: i for term, i in self._model.vocab_dict.items() if i < len(weighs) and weighs[i]}
        self._terms = len(self._model.vocab_dict)

    @property
    def vocabulary_size(self) -> int:
        return self._terms

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        width = min(k, self.num_passages)
        indices = np.full((len(queries), width), -1, dtype=np.int64)  # (Q, width)
        scores = np.zeros((len(queries), width), dtype=np.float32)  # (Q, width)
        vocab = self._vocab
        query_ids = [[vocab[t] for t in self.tokenizer(q) if t in vocab] for q in queries]
        rows = [i for i, ids in enumerate(query_ids) if ids]
        if rows and width:
            found, found_scores = self._model.retrieve(
                [query_ids[i] for i in rows], k=width, n_threads=self.threads if len(rows) > 1 else 0,
                show_progress=False, sorted=False,
            )
            indices[rows] = found
            scores[rows] = found_scores
        return _order_rows(indices, scores, k)

    def _save_data(self, directory: Path) -> None:
        self._model.save(str(directory), show_progress=False)

    def _load_data(self, directory: Path) -> None:
        import bm25s

        self._model = bm25s.BM25.load(str(directory), mmap=True)
        self._set_vocabulary()


class RankBm25Index(BM25Index):
    """The ``rank-bm25`` reference backend: ``BM25Okapi(epsilon=0)``, every passage scored per query."""

    backend = "rank-bm25"

    def __init__(self, tokenizer: Tokenizer, method: str = "robertson", k1: float = 1.5, b: float = 0.75, threads: int = 1) -> None:
        super().__init__(tokenizer, method, k1, b, threads)
        if method != "robertson":
            raise RagkitError(f"the rank-bm25 backend implements only method='robertson' (use the bm25s backend for {method!r})")

    def _build(self, corpus: TokenizedCorpus) -> None:
        from rank_bm25 import BM25Okapi

        # rank-bm25 wants strings; a separate save keeps the ids so a load can rebuild the same model.
        self._corpus = corpus
        terms = corpus.terms()
        documents = [[terms[i] for i in ids] for ids in corpus.passage_ids()]
        self._model = BM25Okapi(documents, k1=self.k1, b=self.b, epsilon=0.0)

    @property
    def vocabulary_size(self) -> int:
        return len(self._corpus.vocab)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        width = min(k, self.num_passages)
        indices = np.full((len(queries), width), -1, dtype=np.int64)  # (Q, width)
        scores = np.zeros((len(queries), width), dtype=np.float32)  # (Q, width)
        for row, query in enumerate(queries):
            tokens = self.tokenizer(query)
            if not tokens or not width:
                continue
            all_scores = self._model.get_scores(tokens)  # (N,) float64
            top = np.argpartition(-all_scores, width - 1)[:width]
            indices[row] = top
            scores[row] = all_scores[top]
        return _order_rows(indices, scores, k)

    def _save_data(self, directory: Path) -> None:
        self._corpus.save(directory)

    def _load_data(self, directory: Path) -> None:
        self._build(TokenizedCorpus.load(directory))


def rankings_agree(
    indices_a: np.ndarray, scores_a: np.ndarray, indices_b: np.ndarray, scores_b: np.ndarray, atol: float = 1e-4
) -> list[int]:
    """Rows where two result sets of the same queries disagree, allowing for ties; [] when they agree.

    Rows agree when they hold the same number of results, their sorted scores match within ``atol``,
    and every passage scoring more than ``atol`` above the row's lowest score is in both with scores
    within ``atol``. Passages tied (within ``atol``) with the lowest score may differ: which of them make
    the cut is arbitrary. Scale the scores first where the backends differ by a constant factor.
    """
    bad = []
    for row in range(indices_a.shape[0]):
        keep_a, keep_b = indices_a[row] >= 0, indices_b[row] >= 0
        ids_a, ids_b = indices_a[row][keep_a], indices_b[row][keep_b]
        sc_a, sc_b = scores_a[row][keep_a].astype(np.float64), scores_b[row][keep_b].astype(np.float64)
        if len(ids_a) != len(ids_b) or not np.allclose(np.sort(sc_a), np.sort(sc_b), rtol=0, atol=atol):
            bad.append(row)
            continue
        if not len(ids_a):
            continue
        floor = min(sc_a.min(), sc_b.min()) + atol
        above_a = {int(i): s for i, s in zip(ids_a, sc_a) if s > floor}
        above_b = {int(i): s for i, s in zip(ids_b, sc_b) if s > floor}
        shared = above_a.keys() & above_b.keys()
        # A passage just above the floor in one list may sit just below it in the other.
        only = {i for i in above_a.keys() ^ above_b.keys() if max(above_a.get(i, 0), above_b.get(i, 0)) > floor + atol}
        if only or any(abs(above_a[i] - above_b[i]) > atol for i in shared):
            bad.append(row)
    return bad
