"""The index version a server answers from, swapped for a newer one without stopping.

:class:`VersionLoader` opens one version of an index artifact as a :class:`Served`: a
:class:`~ragkit.indexing.retrieval.PassageRetriever` per retrieval mode, all sharing one FAISS index, one set
of passage vectors and texts, and the query tower loaded once at start (a swap never reloads the model).
Before a version is served it is checked: the query tower's dimension and fingerprint against the
version's encoder settings, the FAISS index against the version's id map (one vector per live row), a
sample of passages present, and a test query. A version that fails is refused with the reason, and the
one being served goes on serving.

:class:`VersionHolder` holds the served version. A batch takes it with :meth:`VersionHolder.acquire`
(counting a reference) and gives it back with :meth:`VersionHolder.release`; :meth:`VersionHolder.reload`
loads the new version beside the old one, swaps the pointer under a lock (so a batch uses one version
from start to end), and the old version is dropped when its last batch gives it back. The holder follows
the artifact's ``current`` pointer through :meth:`VersionHolder.poll`, which reloads when the pointer
names another version (a pointer to a refused version is not retried until the pointer changes again).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import read_upstream
from ..errors import RagkitError
from ..evaluation import find_ingest
from ..indexing.fingerprint import EncoderSettings, load_encoder
from ..indexing.retrieval import PassageRetriever, check_passage_tower, open_bm25, read_alpha
from ..indexing.versions import CURRENT, IndexVersion, current_version

logger = logging.getLogger("ragkit.serve")

PASSAGE_SAMPLE = 16
"""Passages whose text a version must hold before it is served (spread over its rows)."""


@dataclasses.dataclass
class Served:
    """One loaded version: its retrievers by mode and how many batches are using it."""

    name: str
    encoder: EncoderSettings
    """The version's own encoder settings (what built its passage vectors)."""
    retrievers: dict[str, PassageRetriever]
    passages: int
    refs: int = 0
    retired: bool = False

    def retriever(self, mode: str) -> PassageRetriever:
        if mode not in self.retrievers:
            raise RagkitError(f"retrieval={mode!r} is not served here (served: {', '.join(self.retrievers)}); "
                              "start the server with --mine (bm25) and --alpha (hybrid)")
        return self.retrievers[mode]

    def close(self) -> None:
        """Drop the version's index, vectors and passages (their memory goes with the last reference)."""
        self.retrievers = {}
        self.retired = True


@dataclasses.dataclass
class ReloadResult:
    """What a reload did: ``changed`` when a new version is now served, ``error`` when it was refused."""

    version: str
    previous: str
    changed: bool
    error: str | None = None
    seconds: float = 0.0


class VersionLoader:
    """Opens and checks versions of one index artifact with a query tower loaded once."""

    def __init__(self, index: str | Path, *, modes: tuple[str, ...] = ("dense",), mine: str | Path | None = None,
                 alpha: str | None = None, query_model: tuple[Any, Any, EncoderSettings] | None = None,
                 device: str = "auto", precision: str = "auto", batch_size: int = 128) -> None:
        self.index = Path(index)
        manifest = read_upstream(self.index, "index")
        self.modes = modes
        self.own_encoder = query_model is None
        """True when queries are encoded by the index's own encoder (its query fingerprint must match)."""
        if query_model is None:
            built = IndexVersion.open(self.index).encoder
            query_model = load_encoder(built.path, built.similarity, built.query_max_length, built.passage_max_length)
        self.query_model = query_model
        self.device, self.precision, self.batch_size = device, precision, batch_size
        self.bm25 = self.bm25_lookup = None
        if any(mode != "dense" for mode in modes):
            if mine is None:
                raise RagkitError("bm25 and hybrid retrieval need --mine: the `ragkit mine` artifact of the index's ingest artifact")
            self.bm25, self.bm25_lookup = open_bm25(mine, find_ingest(manifest))
        self.alpha, self.normalize = read_alpha(alpha) if "hybrid" in modes else (None, False)

    @property
    def settings(self) -> EncoderSettings:
        """The query tower's settings."""
        return self.query_model[2]

    def open(self, name: str | None = None) -> Served:
        """Version ``name`` (default: current), checked; a broken one raises :class:`RagkitError` with the reason."""
        version = IndexVersion.open(self.index, name)
        built = version.encoder
        if self.own_encoder:
            self.settings.check_queries(built, version.path)
        else:
            check_passage_tower(self.settings, built, version.path)
        check_id_map(version)
        try:
            dense = PassageRetriever.open(self.index, version.name, mode="dense", query_model=self.query_model,
                                          device=self.device, precision=self.precision, batch_size=self.batch_size)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise RagkitError(f"{version.path}: cannot be opened ({type(exc).__name__}: {exc})") from None
        check_version(dense)
        retrievers = {"dense": dense}
        for mode in self.modes:
            if mode != "dense":
                retrievers[mode] = dense.with_mode(mode, bm25=self.bm25, bm25_lookup=self.bm25_lookup, alpha=self.alpha,
                                                   normalize=self.normalize)
        return Served(version.name, built, retrievers, len(dense))


def check_id_map(version: IndexVersion) -> None:
    """Refuse a version whose ids, vectors and live flags are not one per row."""
    try:
        ids, live, vectors = version.ids(), version.live(), len(version.embeddings())
    except (OSError, ValueError) as exc:
        raise RagkitError(f"{version.path}: unreadable id map or vectors ({exc}); roll back to another version") from None
    if not len(ids) == len(live) == vectors:
        raise RagkitError(f"{version.path}: {len(ids)} ids, {vectors} vectors and {len(live)} live flags disagree "
                          "(roll back to another version)")


def check_version(retriever: PassageRetriever) -> None:
    """Refuse an opened version whose index, vectors or passages disagree, or that cannot answer a query."""
    version = retriever.version
    path = version.path
    index = retriever.searcher.index
    dimension = retriever.searcher.settings.dimension
    if index.index.d != dimension or retriever.dimension != dimension:
        raise RagkitError(f"{path}: holds {index.index.d}-dimensional index vectors and {retriever.dimension}-dimensional "
                          f"embeddings, the query tower makes {dimension} (rebuild the version with the served encoder)")
    ids, live = version.ids(), version.live()
    if len(index) != int(live.sum()):
        raise RagkitError(f"{path}: the FAISS index holds {len(index)} vectors for {int(live.sum())} live passages "
                          "(roll back to another version)")
    if not len(retriever):
        raise RagkitError(f"{path}: holds no live passage")
    rows = np.flatnonzero(live)
    sample = rows[np.linspace(0, len(rows) - 1, min(PASSAGE_SAMPLE, len(rows))).astype(np.int64)]
    texts = [retriever.passages.get(ids[row])["text"] for row in sample]  # raises for a missing passage
    found = retriever.retrieve([texts[0] or "test"], k=1)[0]
    if len(found) != 1 or not np.isfinite(found.scores[0]):
        raise RagkitError(f"{path}: a test query found no passage (roll back to another version)")


class VersionHolder:
    """The served version, swapped between batches and freed when its last batch ends (module docstring)."""

    def __init__(self, loader: VersionLoader) -> None:
        self.loader = loader
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._current = loader.open()
        self._live: list[Served] = [self._current]
        self._seen_pointer: tuple[str, int] | None = self._pointer()
        self.refused: dict[str, str] = {}
        """Version name -> why it was refused, for versions not served."""
        self.opened: "weakref.WeakSet[PassageRetriever]" = weakref.WeakSet(self._current.retrievers.values())
        """Every retriever this holder opened that is still in memory (old versions leave it once freed)."""

    @property
    def current(self) -> Served:
        return self._current

    @property
    def live_versions(self) -> list[str]:
        """Versions loaded and not yet freed: the current one and any still used by a batch."""
        with self._lock:
            return [served.name for served in self._live]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(served.refs for served in self._live)

    def acquire(self) -> Served:
        """The current version, held until :meth:`release` (a batch uses one version throughout)."""
        with self._lock:
            served = self._current
            served.refs += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.refs -= 1
            if served.refs == 0 and served is not self._current:
                self._drop(served)

    def _drop(self, served: Served) -> None:
        """Free a version no batch holds any more (called under the lock)."""
        served.close()
        self._live.remove(served)
        logger.info("freed index version %s", served.name)

    def reload(self, name: str | None = None) -> ReloadResult:
        """Load version ``name`` (default: the ``current`` pointer's) beside the served one and swap to it.

        A version that fails its checks is refused (``error`` says why) and the served one stays.
        """
        with self._reload_lock:
            start = time.perf_counter()
            previous = self._current.name
            self._seen_pointer = self._pointer()
            try:
                target = name or current_version(self.loader.index)
            except RagkitError as exc:
                return self._refuse(name or "?", previous, str(exc), start)
            if target == previous:
                return ReloadResult(target, previous, False, seconds=time.perf_counter() - start)
            try:
                served = self.loader.open(target)
            except RagkitError as exc:
                return self._refuse(target, previous, str(exc), start)
            except Exception as exc:  # a broken file can fail in many ways; none may stop the server
                return self._refuse(target, previous, f"{type(exc).__name__}: {exc}", start)
            with self._lock:
                old = self._current
                self._current = served
                self._live.append(served)
                self.opened.update(served.retrievers.values())
                if old.refs == 0:
                    self._drop(old)
            self.refused.pop(target, None)
            seconds = time.perf_counter() - start
            logger.info("serving index version %s (was %s; loaded in %.2fs)", target, previous, seconds)
            return ReloadResult(target, previous, True, seconds=seconds)

    def _refuse(self, target: str, previous: str, reason: str, start: float) -> ReloadResult:
        self.refused[target] = reason
        logger.error("refused index version %s, still serving %s: %s", target, previous, reason)
        return ReloadResult(target, previous, False, error=reason, seconds=time.perf_counter() - start)

    def _pointer(self) -> tuple[str, int] | None:
        """The ``current`` pointer's content and modification time (None when unreadable)."""
        path = self.loader.index / CURRENT
        try:
            return path.read_text(encoding="utf-8").strip(), path.stat().st_mtime_ns
        except OSError:
            return None

    def poll(self) -> ReloadResult | None:
        """Reload when the ``current`` pointer changed since it was last read and names another version."""
        pointer = self._pointer()
        if pointer is None or pointer == self._seen_pointer:
            return None
        if pointer[0] == self._current.name:
            self._seen_pointer = pointer
            return None
        return self.reload(pointer[0])
