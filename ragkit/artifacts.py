"""Artifact directories: ``manifest.json``, content hashes, atomic writes, upstream checks.

Every stage writes exactly one output directory. It is built under a temporary sibling name and renamed
into place only when complete, so a crash never leaves a half-written artifact where a later stage would
read it. The manifest records what produced the directory (stage, resolved config, command line,
versions, git commit) and what it was produced from (upstream artifacts with the hash of their manifest,
raw input files with their content hash), so a downstream stage can refuse an artifact of the wrong stage,
of another schema, or whose upstream changed after it was built.

A run that is killed outright (``kill -9``, the out-of-memory killer) cannot remove its staging
directory, so each run holds an exclusive ``flock`` on a lock file next to it for its whole life; the
operating system drops that lock when the process dies. The next run into the same output removes the
staging leftovers whose lock it can take, and never those of a live run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import RagkitError

try:
    import fcntl
except ImportError:  # Windows: no flock, so leftovers of killed runs are not removed there
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_LOG = logging.getLogger(__name__)
_RUN_ID = re.compile(r"[0-9a-f]{8}")
_STAGING_KINDS = ("tmp", "old")
"""``.OUT.tmp-ID``: the directory being built; ``.OUT.old-ID``: the replaced output, during the final rename."""

_TRACKED_PACKAGES = ("torch", "transformers", "datasets", "faiss-cpu", "bm25s", "rank-bm25", "numpy")


def ragkit_version() -> str:
    from . import __version__

    return __version__


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "ragkit": ragkit_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hash_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def hash_path(path: str | Path) -> str:
    """Content hash of a file, or of every file below a directory (relative names included)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(hash_file(child).encode())
    return f"sha256:{digest.hexdigest()}"


@dataclasses.dataclass
class Manifest:
    """What an artifact directory holds and where it came from. Serialised as ``manifest.json``."""

    stage: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    ragkit_version: str = dataclasses.field(default_factory=ragkit_version)
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    command: list[str] = dataclasses.field(default_factory=lambda: list(sys.argv))
    versions: dict[str, str] = dataclasses.field(default_factory=package_versions)
    provenance: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"git_commit": _git_commit(), "host": socket.gethostname(), "cwd": os.getcwd()}
    )
    path: Path | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    def save(self, directory: str | Path) -> Path:
        target = Path(directory) / MANIFEST
        write_text_atomic(target, json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default) + "\n")
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        directory = Path(directory)
        target = directory / MANIFEST
        if not directory.exists():
            raise RagkitError(f"{directory}: no such artifact directory (run the stage that writes it first)")
        if not target.is_file():
            raise RagkitError(f"{directory}: not a ragkit artifact, it has no {MANIFEST} (pass a directory written by a ragkit stage)")
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RagkitError(f"{target}: unreadable manifest ({exc}); rebuild this artifact with --overwrite") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.path = directory
        return manifest

    def upstream(self, stage: str) -> Path:
        """Path of the (single) upstream artifact of ``stage`` this artifact was built from."""
        for item in self.inputs:
            if item.get("stage") == stage:
                return Path(item["path"])
        raise RagkitError(f"{self.path}: records no '{stage}' input (rebuild it with this ragkit version)")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_upstream(directory: str | Path, stage: str | tuple[str, ...], verify_inputs: bool = True) -> Manifest:
    """Load the manifest of an upstream artifact, refusing the wrong stage or schema in one line.

    With ``verify_inputs``, each upstream artifact that *it* records must still have the manifest it had
    when it was used, so an artifact built from a since-rebuilt upstream is refused.
    """
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    manifest = Manifest.load(directory)
    if manifest.schema != SCHEMA_VERSION:
        raise RagkitError(
            f"{directory}: artifact schema {manifest.schema}, this ragkit reads schema {SCHEMA_VERSION} "
            f"(rebuild it with `ragkit {manifest.stage} --overwrite`)"
        )
    if manifest.stage not in stages:
        wanted = " or ".join(f"'{s}'" for s in stages)
        raise RagkitError(
            f"{directory}: was written by stage '{manifest.stage}', this stage reads the output of stage {wanted} "
            f"(pass the output directory of `ragkit {stages[0].replace('-', ' ')}`)"
        )
    if verify_inputs:
        for item in manifest.inputs:
            if item.get("kind") != "artifact":
                continue
            ref = Path(item["path"])
            current = ref / MANIFEST
            if not current.is_file():
                raise RagkitError(f"{directory}: its upstream {ref} is gone (rebuild {directory} or restore {ref})")
            if hash_file(current) != item.get("manifest_sha256"):
                raise RagkitError(
                    f"{directory}: its upstream {ref} was rebuilt after it was made "
                    f"(rerun `ragkit {manifest.stage} --overwrite`)"
                )
    return manifest


def artifact_input(directory: str | Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """The record of an upstream artifact inside a downstream manifest's ``inputs``."""
    directory = Path(directory).resolve()
    manifest = manifest or Manifest.load(directory)
    return {
        "kind": "artifact",
        "stage": manifest.stage,
        "path": str(directory),
        "manifest_sha256": hash_file(directory / MANIFEST),
    }


def file_input(path: str | Path, role: str) -> dict[str, Any]:
    """The record of a raw input file (or directory) inside a manifest's ``inputs``."""
    path = Path(path).resolve()
    return {"kind": "file", "role": role, "path": str(path), "sha256": hash_path(path)}


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out`` atomically, on error it is removed.

    An existing non-empty ``out`` is refused unless ``overwrite``. Leftovers of killed runs into ``out``
    are removed first (see :func:`remove_stale_staging`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RagkitError(f"{out}: exists and is not a directory (choose another --out)")
    remove_stale_staging(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RagkitError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id, lock_fd = _claim_run(out)
    tmp, old = (_run_path(out, kind, run_id) for kind in _STAGING_KINDS)
    try:
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        moved = False
        if out.exists():
            os.replace(out, old)
            moved = True
        os.replace(tmp, out)
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        # Only once this run's directories are renamed or removed may another run take its lock.
        _run_path(out, "lock", run_id).unlink(missing_ok=True)
        os.close(lock_fd)


def _run_path(out: Path, kind: str, run_id: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{run_id}"


def _claim_run(out: Path) -> tuple[str, int]:
    """A fresh run id and the descriptor of its lock file ``.OUT.lock-ID``, created and locked by this process.

    The lock exists before the run's directories do and outlives them, so a staging directory without
    one belongs to no live run. A cleaner may take a brand-new lock file in the instant before its
    creator locks it (and then deletes it): the creator sees its file gone and draws another id.
    """
    while True:
        run_id = uuid.uuid4().hex[:8]
        lock = _run_path(out, "lock", run_id)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not _is_same_file(fd, lock):
                os.close(fd)
                continue
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        return run_id, fd


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def remove_stale_staging(out: str | Path) -> list[Path]:
    """Remove the staging directories (``.OUT.tmp-ID``, ``.OUT.old-ID``) of runs into ``out`` that died.

    A run is dead when its lock file ``.OUT.lock-ID`` is missing or can be locked; a live run holds its
    lock, so its directories are kept. Other siblings (the trainer's ``.OUT.work``) are never touched.
    Logs one line when something was removed; returns the removed directories. Without ``fcntl``
    (Windows) nothing is removed.
    """
    out = Path(out)
    if fcntl is None or not out.parent.is_dir():
        return []
    prefix = f".{out.name}."
    run_ids = set()
    for entry in os.scandir(out.parent):
        kind, _, run_id = entry.name[len(prefix):].partition("-")
        if entry.name.startswith(prefix) and kind in (*_STAGING_KINDS, "lock") and _RUN_ID.fullmatch(run_id):
            run_ids.add(run_id)
    removed: list[Path] = []
    owners: list[str] = []
    for run_id in sorted(run_ids):
        lock = _run_path(out, "lock", run_id)
        try:
            fd: int | None = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        except PermissionError:
            continue  # another user's run: not ours to judge
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run
            found = len(removed)
            for kind in _STAGING_KINDS:
                path = _run_path(out, kind, run_id)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    if not path.exists():
                        removed.append(path)
            if fd is not None and len(removed) > found and (owner := _lock_owner(fd)):
                owners.append(owner)
            if fd is not None and _is_same_file(fd, lock):
                lock.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        killed = f" (pid {', '.join(sorted(owners))})" if owners else ""
        _LOG.warning("%s: removed %s, left by killed runs%s", out, ", ".join(p.name for p in removed), killed)
    return removed


def _lock_owner(fd: int) -> str:
    """``PID on HOST`` from a lock file, or '' when it is unreadable."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{int(data['pid'])} on {data['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def work_dir_for(out: str | Path) -> Path:
    """The stable directory beside ``out`` where a long stage keeps resumable work: ``<parent>/.<name>.work``."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")
