"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer import corpus, write_tiny_model
from typer.testing import CliRunner

from ragkit.cli import app


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """Raw jsonl files through `ragkit ingest` and `ragkit mine`."""
    root = tmp_path_factory.mktemp("cli")
    passages, train, dev = corpus()
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for p in passages:
            handle.write(json.dumps({k: p[k] for k in ("id", "title", "text")}) + "\n")
    for split, rows in (("train", train), ("dev", dev)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for q in rows:
                handle.write(json.dumps({k: q[k] for k in ("id", "question", "answers", "positive_ids")}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(root / "corpus.jsonl"), f"train={root / 'train.jsonl'}",
                                 f"dev={root / 'dev.jsonl'}", "--out", str(root / "ingest")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["mine", str(root / "ingest"), "--out", str(root / "mine"), "--negatives", "4", "--workers", "1"])
    assert result.exit_code == 0, result.output
    write_tiny_model(root / "tiny")
    write_tiny_model(root / "still", dropout=0.0)
    return root
