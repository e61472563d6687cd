"""ragkit: from a raw text corpus to a retrieval-augmented QA system, stage by stage.

Every stage is a function taking plain arguments and returning the :class:`~ragkit.artifacts.Manifest` of
the artifact directory it wrote; ``ragkit <stage>`` on the command line calls the same function.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any


def ingest(inputs: list[str], out: str, **options: Any):
    """Read corpora / QA sets and write passages + questions (see :class:`ragkit.config.IngestConfig`)."""
    from .config import IngestConfig
    from .corpus import run

    return run(IngestConfig(inputs=list(inputs), out=out, **options))


def train_retriever(mine: str, out: str, **options: Any):
    """Fine-tune a dual encoder on a mine artifact's examples (see :class:`ragkit.config.TrainRetrieverConfig`)."""
    from .config import TrainRetrieverConfig
    from .retriever.trainer import run

    return run(TrainRetrieverConfig(mine=str(mine), out=str(out), **options))


def mine(ingest: str, out: str, **options: Any):
    """BM25-retrieve every question and write positives + hard negatives (see :class:`ragkit.config.MineConfig`)."""
    from .config import MineConfig
    from .mining import run

    return run(MineConfig(ingest=str(ingest), out=str(out), **options))


def evaluate(artifact: str, out: str, **options: Any):
    """Score the runs of a mine / index artifact (see :class:`ragkit.config.EvaluateConfig`)."""
    from .config import EvaluateConfig
    from .evaluation import run

    return run(EvaluateConfig(artifact=str(artifact), out=str(out), **options))


def index(ingest: str, out: str, model: str = "minilm", **options):
    """Encode an ingest artifact's passages, build a FAISS index and write dense runs (see :class:`ragkit.config.IndexConfig`)."""
    from .config import IndexConfig
    from .indexing.stage import run

    return run(IndexConfig(ingest=str(ingest), out=str(out), model=str(model), **options))
