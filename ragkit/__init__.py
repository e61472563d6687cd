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
