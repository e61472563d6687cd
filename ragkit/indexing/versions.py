"""Index versions: immutable directories, a ``current`` pointer, updates by passage id, rollback.

An index artifact holds one directory per version and a pointer to the one in use::

    current                          "v0002": the version readers load
    versions/v0001/                  written by `ragkit index build`
    versions/v0002/                  written by `ragkit index update`, parent v0001
        version.json                 parent, counts, changes, encoder settings and fingerprints, FAISS factory
        index.faiss                  every live row's vector, labelled by its row
        segments/0000/               embeddings.npy + ids.txt: the rows of v0001 (hard links to v0001's files)
        segments/0001/               the rows this update added (added and replaced passages)
        live.npy                     bool per row: False for rows deleted or replaced since
        passages.jsonl               overlay: {id, title, text} of every passage added or replaced so far
        deleted.txt                  ids of the ingest artifact's passages deleted so far

Rows are numbered across segments in order; a row never changes, so an update only appends a segment and
clears ``live`` flags, leaving every other vector where it was (nothing is re-encoded). Readers fetch a
passage's text by id from the overlay first, then from the ingest artifact (:class:`VersionPassages`).

An update builds the new version in a temporary directory beside the others, renames it into place and
only then moves ``current`` (a temporary file and ``os.replace``), so a reader sees the old version or the
new one, never a half-written one; a failure removes everything it wrote and leaves ``current`` alone.
Files of the parent are never modified: unchanged segments are hard-linked (copied where the file system
cannot link). Kinds of FAISS index that cannot delete (HNSW) are rebuilt from the kept embeddings, and the
log says so. :func:`rollback` moves ``current`` back to a parent, whose files are untouched, so its results
come back exactly. One update at a time per index.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..artifacts import file_input, read_upstream, staged_output, write_json_atomic, write_text_atomic
from ..errors import RagkitError, located
from ..ingestion.files import jsonl_records, read_lines
from ..retriever.distributed import main_process_logger
from .encode import EMBEDDINGS_FILE, IDS_FILE, PassageTexts, encode_passages, open_embeddings, read_ids
from .faiss_index import FaissIndex, build_index
from .fingerprint import EncoderSettings

CURRENT = "current"
VERSIONS = "versions"
VERSION_FILE = "version.json"
INDEX_FILE = "index.faiss"
SEGMENTS = "segments"
LIVE_FILE = "live.npy"
OVERLAY_FILE = "passages.jsonl"
DELETED_FILE = "deleted.txt"
FIRST_VERSION = "v0001"

logger = main_process_logger("ragkit.index")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def _version_number(name: str) -> int | None:
    return int(name[1:]) if len(name) > 1 and name[0] == "v" and name[1:].isdigit() else None


# --- reading a version -------------------------------------------------------------------------------


class SegmentedEmbeddings:
    """The embeddings of every segment as one ``(rows, D)`` matrix, read-only, memory-mapped.

    Supports ``len``, ``shape``, slices and sorted or unsorted integer row arrays.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.dimension = self.parts[0].shape[1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dimension

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dimension), dtype=np.float32)  # (n, D)
        segment = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(segment):
            where = segment == s
            out[where] = self.parts[s][rows[where] - self.offsets[s]]
        return out


class IndexVersion:
    """One version directory of an index artifact (see the module docstring for its files)."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = Path(path)
        self.info = info

    @classmethod
    def open(cls, artifact: str | Path, name: str | None = None) -> "IndexVersion":
        """Version ``name`` of an index artifact, by default the ``current`` one."""
        artifact = Path(artifact)
        name = name or current_version(artifact)
        path = artifact / VERSIONS / name
        info_file = path / VERSION_FILE
        if not info_file.is_file():
            known = ", ".join(list_versions(artifact)) or "none"
            raise RagkitError(f"{artifact}: has no version {name!r} (versions: {known})")
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RagkitError(f"{info_file}: unreadable ({exc}); roll back to another version or rebuild the index") from None
        return cls(path, info)

    @property
    def name(self) -> str:
        return self.info["version"]

    @property
    def parent(self) -> str | None:
        return self.info.get("parent")

    @property
    def encoder(self) -> EncoderSettings:
        return EncoderSettings.from_dict(self.info["encoder"])

    @property
    def segment_dirs(self) -> list[Path]:
        return [self.path / SEGMENTS / name for name in self.info["segments"]]

    def embeddings(self) -> SegmentedEmbeddings:
        return SegmentedEmbeddings([open_embeddings(d) for d in self.segment_dirs])

    def ids(self) -> list[str]:
        """Passage id of every row (deleted and replaced rows included: see :meth:`live`)."""
        return [pid for d in self.segment_dirs for pid in read_ids(d)]

    def live(self) -> np.ndarray:
        return np.load(self.path / LIVE_FILE)

    def load_index(self) -> FaissIndex:
        return FaissIndex.load(self.path / INDEX_FILE, self.info["similarity"], self.info["factory"])

    def overlay(self) -> dict[str, dict[str, str]]:
        """Added and replaced passages by id: ``{"id", "title", "text"}``."""
        rows = {}
        with open(self.path / OVERLAY_FILE, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    rows[row["id"]] = row
        return rows

    def deleted(self) -> set[str]:
        return set((self.path / DELETED_FILE).read_text(encoding="utf-8").splitlines())


class VersionPassages:
    """Passage text by id for one version: its overlay first, then the ingest artifact's passages."""

    def __init__(self, version: IndexVersion, ingest_dir: str | Path) -> None:
        from ..evaluation import PassageLookup

        self.version = version
        self.added = version.overlay()
        self.deleted = version.deleted()
        self.ingest = PassageLookup.open(ingest_dir)

    def get(self, passage_id: str) -> dict[str, str]:
        """``{"id", "title", "text"}`` of a passage of this version."""
        if passage_id in self.added:
            return self.added[passage_id]
        if passage_id in self.deleted:
            raise RagkitError(f"{self.version.path}: passage {passage_id!r} was deleted in or before this version")
        row = self.ingest.rows([passage_id], str(self.version.path))[0]
        return {"id": passage_id, "title": self.ingest.titles_at([row])[0], "text": self.ingest.texts_at([row])[0]}


def current_version(artifact: str | Path) -> str:
    path = Path(artifact) / CURRENT
    if not path.is_file():
        raise RagkitError(f"{artifact}: has no '{CURRENT}' file, not an index artifact (pass the output of `ragkit index`)")
    return path.read_text(encoding="utf-8").strip()


def set_current(artifact: str | Path, name: str) -> None:
    """Point ``current`` at version ``name`` atomically."""
    write_text_atomic(Path(artifact) / CURRENT, f"{name}\n")


def list_versions(artifact: str | Path) -> list[str]:
    root = Path(artifact) / VERSIONS
    names = [p.name for p in root.iterdir() if p.is_dir() and _version_number(p.name) is not None] if root.is_dir() else []
    return sorted(names, key=_version_number)


# --- writing a version -------------------------------------------------------------------------------


def write_version_files(path: Path, *, index: FaissIndex, live: np.ndarray, overlay: Iterable[dict[str, str]],
                        deleted: Iterable[str], info: dict[str, Any]) -> None:
    """Write a version's index, live flags, overlay, deletions and ``version.json`` (segments are already there)."""
    index.save(path / INDEX_FILE)
    np.save(path / LIVE_FILE, np.asarray(live, dtype=bool))
    with open(path / OVERLAY_FILE, "w", encoding="utf-8") as handle:
        for row in overlay:
            handle.write(json.dumps({"id": row["id"], "title": row["title"], "text": row["text"]}, ensure_ascii=False) + "\n")
    (path / DELETED_FILE).write_text("".join(f"{pid}\n" for pid in sorted(deleted)), encoding="utf-8")
    write_json_atomic(path / VERSION_FILE, info)


def version_info(name: str, parent: str | None, *, encoder: EncoderSettings, factory: str, similarity: str,
                 segments: list[str], dtype: str, live: np.ndarray, counts: dict[str, Any],
                 changes: dict[str, Any], rebuilt: bool, train_sample: int) -> dict[str, Any]:
    return {
        "version": name,
        "parent": parent,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "factory": factory,
        "similarity": similarity,
        "dtype": dtype,
        "encoder": encoder.to_dict(),
        "segments": segments,
        "counts": {"passages": int(live.sum()), "rows": int(len(live)), **counts},
        "changes": changes,
        "rebuilt": rebuilt,
        "train_sample": train_sample,
    }


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# --- update input ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Changes:
    """Passages to add and replace (``{id, title, text}``) and ids to delete, with where each came from."""

    add: list[dict[str, str]] = dataclasses.field(default_factory=list)
    replace: list[dict[str, str]] = dataclasses.field(default_factory=list)
    delete: list[str] = dataclasses.field(default_factory=list)
    where: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    """id -> (file, line) for error messages."""

    def __bool__(self) -> bool:
        return bool(self.add or self.replace or self.delete)

    def check_against(self, row_of: dict[str, int]) -> None:
        """Added ids must be new; replaced and deleted ids must be live in the index."""
        for row in self.add:
            if row["id"] in row_of:
                raise located(*self.where[row["id"]], f"passage {row['id']!r} is already in the index (use --replace to change it)")
        for pid in [row["id"] for row in self.replace] + self.delete:
            if pid not in row_of:
                raise located(*self.where[pid], f"passage {pid!r} is not in the index (use --add for new passages)")


def read_changes(add: str | None, replace: str | None, delete: str | None) -> Changes:
    """Read the update files: jsonl passages ``{id, title, text}`` for add / replace, one id a line for delete.

    An id may appear once over all three files.
    """
    changes = Changes()
    for kind, path in (("add", add), ("replace", replace), ("delete", delete)):
        if path and not Path(path).is_file():
            raise RagkitError(f"{path}: no such file (check the --{kind} path)")
    for kind, path in (("add", add), ("replace", replace)):
        if path:
            for line_no, row in jsonl_records(Path(path)):
                passage = _passage(row, path, line_no)
                _check_new(changes, passage["id"], path, line_no)
                getattr(changes, kind).append(passage)
    if delete:
        for line_no, line in read_lines(Path(delete)):
            pid = line.strip()
            if not pid:
                continue
            if any(c.isspace() for c in pid):
                raise located(delete, line_no, f"id {pid!r} holds white space (one passage id a line)")
            _check_new(changes, pid, delete, line_no)
            changes.delete.append(pid)
    return changes


def _check_new(changes: Changes, pid: str, path: str, line_no: int) -> None:
    first = changes.where.setdefault(pid, (path, line_no))
    if first != (path, line_no):
        raise located(path, line_no, f"passage {pid!r} is listed again (first at {first[0]}:{first[1]}); list each id once")


def _passage(row: dict[str, Any], path: str, line_no: int) -> dict[str, str]:
    for field in ("id", "text"):
        if not isinstance(row.get(field), str) or not row[field]:
            raise located(path, line_no, f"missing or empty string field '{field}' (each line needs id, text and optionally title)")
    if any(c.isspace() for c in row["id"]):
        raise located(path, line_no, f"id {row['id']!r} holds white space, which TREC runs cannot hold; choose another id")
    if not isinstance(row.get("title", ""), str):
        raise located(path, line_no, "field 'title' must be a string")
    return {"id": row["id"], "title": row.get("title", ""), "text": row["text"]}


# --- update and rollback -----------------------------------------------------------------------------


def update(cfg: Any) -> IndexVersion:
    """Apply ``cfg.add`` / ``cfg.replace`` / ``cfg.delete`` to the current version of ``cfg.index`` as a new
    version, then make it current (see the module docstring). ``cfg`` is an
    :class:`~ragkit.config.IndexUpdateConfig`. Bad input changes nothing on disk."""
    from .fingerprint import load_encoder

    artifact = Path(cfg.index)
    read_upstream(artifact, "index")
    parent = IndexVersion.open(artifact)
    changes = read_changes(cfg.add, cfg.replace, cfg.delete)
    if not changes:
        raise RagkitError("nothing to update (pass --add, --replace and/or --delete with a file)")
    ids, live = parent.ids(), parent.live()
    row_of = {ids[row]: int(row) for row in np.flatnonzero(live)}
    changes.check_against(row_of)
    encoder = None
    if changes.add or changes.replace or cfg.model:
        built = parent.encoder
        *encoder, settings = load_encoder(cfg.model or built.path, built.similarity, built.query_max_length,
                                          built.passage_max_length)
        settings.check_passages(built, parent.path)

    name = version_name(max(_version_number(v) for v in list_versions(artifact)) + 1)
    final = artifact / VERSIONS / name
    try:
        # Builds .vNNNN.tmp-ID and renames it to vNNNN when complete; a killed update's leftovers go next time.
        with staged_output(final) as staging:
            _write_update(staging, name, parent, changes, row_of, live, encoder, cfg)
        set_current(artifact, name)
    except BaseException:
        if final.exists() and current_version(artifact) != name:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return IndexVersion.open(artifact, name)


def _write_update(staging: Path, name: str, parent: IndexVersion, changes: Changes, row_of: dict[str, int], live: np.ndarray,
                  encoder: list[Any] | None, cfg: Any) -> None:
    """Write version ``name`` = ``parent`` + ``changes`` into ``staging``: segments (the parent's linked, the new
    passages encoded), live flags, the index with removed rows dropped and new rows added, overlay, info."""
    from .encode import resolve_device, resolve_precision

    info = parent.info
    segments = list(info["segments"])
    for segment in segments:
        (staging / SEGMENTS / segment).mkdir(parents=True)
        for file_name in (EMBEDDINGS_FILE, IDS_FILE):
            _link_or_copy(parent.path / SEGMENTS / segment / file_name, staging / SEGMENTS / segment / file_name)
    removed = np.array(sorted(row_of[pid] for pid in [r["id"] for r in changes.replace] + changes.delete), dtype=np.int64)
    live = live.copy()
    live[removed] = False
    first_new = len(live)
    new_passages = changes.add + changes.replace
    if new_passages:
        model, tokenizer = encoder
        device = resolve_device(cfg.device)
        model.to(device)
        segments.append(f"{len(segments):04d}")
        encode_passages(model, tokenizer, PassageTexts([r["id"] for r in new_passages], [r["title"] for r in new_passages],
                                                       [r["text"] for r in new_passages]),
                        staging / SEGMENTS / segments[-1], parent.encoder.passage_max_length, batch_size=cfg.batch_size,
                        autocast_dtype=resolve_precision(cfg.precision, device), dtype=info["dtype"])
        live = np.concatenate([live, np.ones(len(new_passages), dtype=bool)])
    index = parent.load_index()
    rebuilt = False
    if len(removed) and not index.remove(removed):
        kept = np.flatnonzero(live[:first_new])
        logger.warning("index %s cannot delete vectors: rebuilding it from the %d kept embeddings", info["factory"], len(kept))
        index, _ = build_index(info["factory"], parent.embeddings(), kept, info["similarity"], rows=kept,
                               train_sample=info["train_sample"])
        rebuilt = True
    if new_passages:
        index.add(open_embeddings(staging / SEGMENTS / segments[-1]), np.arange(first_new, first_new + len(new_passages)))
    gone = {r["id"] for r in changes.replace} | set(changes.delete)
    overlay = [row for pid, row in parent.overlay().items() if pid not in gone] + new_passages
    # Ids an ingest passage may hold; readers look here only for ids missing from the overlay.
    deleted = (parent.deleted() | set(changes.delete)) - {r["id"] for r in changes.add}
    sources = {kind: file_input(path, kind) for kind, path in (("add", cfg.add), ("replace", cfg.replace),
                                                               ("delete", cfg.delete)) if path}
    new_info = version_info(
        name, parent.name, encoder=parent.encoder, factory=info["factory"], similarity=info["similarity"],
        segments=segments, dtype=info["dtype"], live=live,
        counts={"added": len(changes.add), "replaced": len(changes.replace), "deleted": len(changes.delete)},
        changes=sources, rebuilt=rebuilt, train_sample=info["train_sample"],
    )
    write_version_files(staging, index=index, live=live, overlay=overlay, deleted=deleted, info=new_info)


def rollback(index: str | Path, to: str | None = None) -> IndexVersion:
    """Point ``current`` back at version ``to`` (default: the current version's parent) and return it."""
    artifact = Path(index)
    read_upstream(artifact, "index")
    current = IndexVersion.open(artifact)
    target = to or current.parent
    if target is None:
        raise RagkitError(f"{artifact}: {current.name} is the first version, there is nothing to roll back to")
    version = IndexVersion.open(artifact, target)
    set_current(artifact, version.name)
    return version
