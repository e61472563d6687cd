"""``ragkit index build``: encode a corpus, index it with FAISS, and write dense runs for question splits.

Inputs: an encoder (a ``train-retriever`` artifact, a Hugging Face model directory, or an alias such as
``minilm`` for zero-shot retrieval) and an ingest artifact (or a mine artifact, which names its ingest).
Wrong-stage artifacts and artifacts whose upstream was rebuilt are refused.

1. **Encode** every passage (:mod:`ragkit.indexing.encode`) in shards kept in a work directory beside the
   output (:mod:`ragkit.indexing.shards`). Without ``--shard`` the run encodes whatever shards are missing,
   so a crashed run resumes from its finished shards. Under ``torchrun`` each process encodes the missing
   shards ``s`` with ``s % world == rank``; with ``--shard i/N`` a run encodes shard ``i`` and stops, so N
   machines can share the work before one final run without ``--shard`` merges.
2. **Merge** the shards into the first version's embeddings, streaming, and **build** the FAISS index
   (:mod:`ragkit.indexing.faiss_index`) from them.
3. **Search** each question split asked for (default: ``dev`` when the ingest artifact has it) over the
   whole corpus and write ``runs/<split>.trec`` (tag ``ragkit-dense``), which ``ragkit evaluate`` scores
   like the BM25 runs of ``ragkit mine``.

The artifact is written under a temporary name and renamed into place; the work directory is removed
once it is complete. Its layout and later versions: :mod:`ragkit.indexing.versions`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import MANIFEST, Manifest, artifact_input, hash_file, read_upstream, staged_output, work_dir_for
from ..config import IndexConfig, as_dict
from ..errors import RagkitError
from ..evaluation import PassageLookup, load_questions
from ..retriever.distributed import DistInfo, barrier, cleanup_distributed, init_distributed, is_distributed
from .encode import LookupPassages, encode_passages, open_embeddings, precision_name, read_ids, resolve_device, resolve_precision
from .faiss_index import FaissIndex, build_index
from .fingerprint import load_encoder
from .search import DenseSearcher, write_run
from .shards import Shard, ShardSet, auto_shard_count
from .versions import CURRENT, FIRST_VERSION, SEGMENTS, VERSIONS, set_current, version_info, write_version_files

STAGE = "index"
SHARDS_DIR = "shards"
FIRST_SEGMENT = "0000"


def run(cfg: IndexConfig) -> Manifest | None:
    """Build the index artifact ``cfg.out``; returns its manifest, or None from a ``--shard`` run and from
    every ``torchrun`` process but the first (they only encode)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    joined_here = not is_distributed()
    dist_info = init_distributed()
    try:
        return IndexBuild(cfg, dist_info).run()
    finally:
        if joined_here:
            cleanup_distributed()


def resolve_ingest(path: str | Path) -> tuple[Path, Manifest]:
    """An ingest artifact, or the ingest artifact a mine artifact was made from."""
    manifest = read_upstream(path, ("ingest", "mine"))
    if manifest.stage == "mine":
        ingest_dir = manifest.upstream("ingest")
        return ingest_dir, read_upstream(ingest_dir, "ingest")
    return Path(path), manifest


class IndexBuild:
    """One ``ragkit index build`` run: settings are checked and the encoder loaded before any work starts."""

    def __init__(self, cfg: IndexConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.out = Path(cfg.out)
        self.shard = Shard.parse(cfg.shard) if cfg.shard else None
        if self.shard is None:
            self._check_output()
        self.ingest_dir, self.ingest = resolve_ingest(cfg.ingest)
        self.inputs = [artifact_input(self.ingest_dir, self.ingest)]
        model_dir = Path(cfg.model)
        if (model_dir / MANIFEST).is_file():
            self.inputs.insert(0, artifact_input(model_dir, read_upstream(model_dir, "train-retriever")))
        self.splits = self._splits()
        self.device = resolve_device(cfg.device, dist_info)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.model, self.tokenizer, self.settings = load_encoder(cfg.model, cfg.similarity, cfg.query_max_length,
                                                                 cfg.passage_max_length)
        self.model.to(self.device)
        FaissIndex.create(cfg.factory, self.settings.dimension, self.settings.similarity)  # refuse a bad factory now
        self.passages = PassageLookup.open(self.ingest_dir)
        if len(self.passages) == 0:
            raise RagkitError(f"{self.ingest_dir}/passages: is empty (ingest a corpus with at least one passage)")

    def _check_output(self) -> None:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not self.cfg.overwrite:
            raise RagkitError(f"{self.out}: output directory exists and is not empty (pass --overwrite to replace it)")

    def _splits(self) -> list[str]:
        root = self.ingest_dir / "questions"
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for split in self.cfg.splits:
            if split not in available:
                raise RagkitError(f"{root}: has no '{split}' split (splits: {', '.join(available) or 'none'})")
        return list(self.cfg.splits) or (["dev"] if "dev" in available else [])

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> Manifest | None:
        shards = self._open_shards()
        started = time.perf_counter()
        encoded = self._encode(shards)
        seconds = time.perf_counter() - started
        if self.shard is not None:
            return None
        barrier()
        if not self.dist.is_main:
            return None
        manifest = self._write_artifact(shards, encoded, seconds)
        shutil.rmtree(work_dir_for(self.out), ignore_errors=True)
        return manifest

    def _open_shards(self) -> ShardSet:
        """Join (or start) the encoding in the work directory; the first process starts it, the others join."""
        plan = {
            "passages": len(self.passages),
            "dimension": self.settings.dimension,
            "ingest_manifest_sha256": hash_file(self.ingest_dir / MANIFEST),
            "passage_fingerprint": self.settings.passage_fingerprint,
            "precision": precision_name(self.autocast_dtype),
            "dtype": self.cfg.dtype,
            "shards": self.shard.count if self.shard else self.cfg.shards,
        }
        root = work_dir_for(self.out) / SHARDS_DIR
        default_count = auto_shard_count(len(self.passages), self.dist.world_size)
        alone = self.shard is None  # no other machine writes this encoding
        shards = None
        if self.dist.is_main:
            shards = ShardSet.open(root, plan, default_count, discard_other=self.cfg.overwrite and alone)
            if alone:
                shards.discard_staging()
        barrier()
        return shards or ShardSet.open(root, plan, default_count)

    def _encode(self, shards: ShardSet) -> int:
        """Encode this process's missing shards; returns the passages it encoded."""
        from tqdm.auto import tqdm

        if self.shard is not None:
            todo = [self.shard.index] if not shards.finished(self.shard.index) else []
        else:
            todo = [s for s in shards.missing() if s % self.dist.world_size == self.dist.rank]
        rows = [shards.shard(s).rows(len(self.passages)) for s in todo]
        total = sum(stop - start for start, stop in rows)
        source = LookupPassages(self.passages)
        desc = "encode passages" + (f" (rank {self.dist.rank})" if self.dist.world_size > 1 else "")
        with tqdm(total=total, desc=desc, unit="passage", dynamic_ncols=True) as bar:
            for index, (start, stop) in zip(todo, rows):
                staging = shards.staging(index)
                try:
                    encode_passages(self.model, self.tokenizer, source, staging, self.settings.passage_max_length,
                                    start=start, stop=stop, batch_size=self.cfg.batch_size,
                                    autocast_dtype=self.autocast_dtype, dtype=self.cfg.dtype, progress=bar)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                shards.finish(index, staging)
        return total

    def _write_artifact(self, shards: ShardSet, encoded: int, seconds: float) -> Manifest:
        from tqdm.auto import tqdm

        cfg, settings = self.cfg, self.settings
        counts: dict[str, Any] = {
            "passages": len(self.passages),
            "dimension": settings.dimension,
            "shards": shards.count,
            "passages_encoded": encoded,
            "encode_seconds": round(seconds, 2),
            "passages_per_second": round(encoded / seconds, 1) if encoded and seconds > 0 else None,
        }
        files = {"current": CURRENT, "versions": VERSIONS}
        with staged_output(self.out, cfg.overwrite) as tmp:
            version_dir = tmp / VERSIONS / FIRST_VERSION
            segment = shards.merge(version_dir / SEGMENTS / FIRST_SEGMENT, settings.dimension)
            started = time.perf_counter()
            labels = np.arange(len(self.passages), dtype=np.int64)
            index, trained = build_index(cfg.factory, open_embeddings(segment), labels, settings.similarity,
                                         cfg.train_sample, cfg.seed)
            counts["index_seconds"] = round(time.perf_counter() - started, 2)
            counts["index_trained_on"] = trained
            live = np.ones(len(self.passages), dtype=bool)
            info = version_info(FIRST_VERSION, None, encoder=settings, factory=cfg.factory, similarity=settings.similarity,
                                segments=[FIRST_SEGMENT], dtype=cfg.dtype, live=live, counts={}, changes={},
                                rebuilt=False, train_sample=cfg.train_sample)
            write_version_files(version_dir, index=index, live=live, overlay=[], deleted=[], info=info)
            set_current(tmp, FIRST_VERSION)

            searcher = DenseSearcher(self.model, self.tokenizer, settings, index, read_ids(segment),
                                     autocast_dtype=self.autocast_dtype, batch_size=cfg.batch_size,
                                     nprobe=cfg.nprobe, ef_search=cfg.ef_search)
            counts["questions"] = {}
            if self.splits:
                (tmp / "runs").mkdir()
            for split in self.splits:
                questions = load_questions(self.ingest_dir, split)
                with tqdm(total=len(questions), desc=f"search {split}", unit="q", leave=False) as bar:
                    counts["questions"][split] = write_run(searcher, questions, tmp / "runs" / f"{split}.trec",
                                                           cfg.depth, progress=bar)
                files[f"runs/{split}"] = f"runs/{split}.trec"
            config = as_dict(cfg)
            config["encoder"] = settings.to_dict()
            config["precision_used"] = precision_name(self.autocast_dtype)
            manifest = Manifest(stage=STAGE, config=config, inputs=self.inputs, counts=counts, files=files)
            manifest.save(tmp)
        manifest.path = self.out
        return manifest
