"""ragkit: from a raw text corpus to a retrieval-augmented QA system, stage by stage.

Every stage is a function taking plain arguments and returning the :class:`~ragkit.artifacts.Manifest` of
the artifact directory it wrote; ``ragkit <stage>`` on the command line calls the same function.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path
from typing import Any


def ingest(inputs: Any = None, out: str | None = None, **options: Any):
    """Read corpora / QA sets and write passages + questions (see :class:`ragkit.config.IngestConfig`).

    ``inputs``: paths (``split=path`` names a question file's split), or in-memory records for the train split:
    a pandas DataFrame or a list of dicts with simpletransformers' columns ``query_text``, ``gold_passage``,
    ``title`` (and optionally ``hard_negative``, ``answers``). A keyword named after a split gives that split's
    records or file: ``ragkit.ingest(train=train_df, dev=dev_df, out="work/nb")``.
    """
    from .config import IngestConfig
    from .ingestion import run
    from .ingestion.frames import sort_arguments

    if out is None:
        raise TypeError("ingest() needs out=, the artifact directory to write")
    paths, frames, settings = sort_arguments(inputs, options)
    return run(IngestConfig(inputs=paths, out=str(out), **settings), frames)


def train_retriever(mine: str, out: str, **options: Any):
    """Fine-tune a dual encoder on a mine artifact's examples (see :class:`ragkit.config.TrainRetrieverConfig`)."""
    from .config import TrainRetrieverConfig
    from .retriever.trainer import run

    return run(TrainRetrieverConfig(mine=str(mine), out=str(out), **options))


def export_dpr(retriever: str, out: str, **options: Any):
    """Write a trained retriever as DPR question + context encoders (see :mod:`ragkit.retriever.dpr`)."""
    from .config import ExportDprConfig
    from .retriever.dpr import run

    return run(ExportDprConfig(retriever=str(retriever), out=str(out), **options))


def mine(ingest: str, out: str, **options: Any):
    """BM25-retrieve every question and write positives + hard negatives (see :class:`ragkit.config.MineConfig`)."""
    from .config import MineConfig
    from .mining import run

    return run(MineConfig(ingest=str(ingest), out=str(out), **options))


def evaluate(artifact: str | list[str], out: str, **options: Any):
    """Score the runs of an artifact (mine, index, hybrid), or of several side by side: pass a list of
    artifacts or ``name=path`` entries (see :class:`ragkit.config.EvaluateConfig`)."""
    from .config import EvaluateConfig
    from .evaluation import run

    runs = [artifact] if isinstance(artifact, (str, Path)) else list(artifact)
    return run(EvaluateConfig(runs=[str(r) for r in runs], out=str(out), **options))


def hybrid(dense: str, bm25: str, out: str, **options: Any):
    """Fuse the runs of two artifacts, dense and BM25 (see :class:`ragkit.config.HybridConfig`)."""
    from .config import HybridConfig
    from .indexing.hybrid import run

    return run(HybridConfig(dense=str(dense), bm25=str(bm25), out=str(out), **options))


def index(ingest: str, out: str, model: str = "minilm", **options):
    """Encode an ingest artifact's passages, build a FAISS index and write dense runs (see :class:`ragkit.config.IndexConfig`)."""
    from .config import IndexConfig
    from .indexing.stage import run

    return run(IndexConfig(ingest=str(ingest), out=str(out), model=str(model), **options))


def train_reader(index: str, out: str, generator: str = "smollm2", **options: Any):
    """Fine-tune a RAG reader (generator + query tower) over a fixed index (see :class:`ragkit.reader.config.TrainReaderConfig`)."""
    from .reader.config import TrainReaderConfig
    from .reader.train import run

    return run(TrainReaderConfig(index=str(index), out=str(out), generator=str(generator), **options))


def answer(reader: str = "smollm2", question: str | None = None, **options: Any):
    """One question's :class:`~ragkit.reader.rag.Prediction`, or (with ``split=`` / ``questions=`` and ``out=``)
    the manifest of an answer artifact (see :class:`ragkit.reader.config.AnswerConfig`)."""
    from .reader.answer import answer_one, run
    from .reader.config import AnswerConfig

    cfg = AnswerConfig(reader=str(reader), question=question, **options)
    return answer_one(cfg) if question is not None else run(cfg)
