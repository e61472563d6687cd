"""A tiny served index (the indexing tests' corpus and encoders) and a real server on a loopback port."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import uvicorn
from typer.testing import CliRunner

from indexing_data import write_ingest, write_tiny_model
from tiny_generators import tiny_llama
from ragkit.cli import app as cli
from ragkit.config import ServeConfig
from ragkit.serving.app import create_app, open_holder

runner = CliRunner()


def invoke(*args) -> str:
    result = runner.invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def build_data(root: Path) -> dict[str, Path]:
    """Ingest + BM25 mine + an index of the tiny encoder, two encoders it must refuse, and a tiny generator."""
    ingest = write_ingest(root)
    model = write_tiny_model(root / "tiny")
    invoke("mine", ingest, "--out", root / "mine", "--depth", 20)
    invoke("index", "build", ingest, "--model", model, "--out", root / "index", "--device", "cpu", "--precision", "fp32")
    tiny_llama(root / "llama")
    return {"root": root, "ingest": ingest, "model": model, "mine": root / "mine", "index": root / "index",
            "other": write_tiny_model(root / "other", seed=1), "wide": write_tiny_model(root / "wide", hidden=48),
            "llama": root / "llama"}


def load_reader(data: dict[str, Path], index: Path | None = None):
    """The tiny generator read with the index's own query tower."""
    from ragkit.reader.rag import RagReader

    return RagReader.load(str(data["llama"]), index=index or data["index"], device="cpu", precision="fp32")


def copy_index(data: dict[str, Path], target: Path) -> Path:
    """A fresh copy of the built index artifact (tests change its versions)."""
    shutil.copytree(data["index"], target)
    return target


def added_passage(topic: int) -> dict[str, str]:
    """A passage of words no corpus passage holds; its text, asked as a question, finds it first."""
    return {"id": f"n{topic}", "title": "", "text": f"w{topic}x0 w{topic}x1 w{topic}x2 ans{topic}"}


def add_passage(index: Path, topic: int, work: Path) -> None:
    path = work / f"add-{topic}.jsonl"
    path.write_text(json.dumps(added_passage(topic)) + "\n", encoding="utf-8")
    invoke("index", "update", index, "--add", path, "--device", "cpu", "--precision", "fp32")


def serve_config(index: Path, **overrides) -> ServeConfig:
    settings = dict(index=str(index), device="cpu", precision="fp32", poll_seconds=0)
    return ServeConfig(**{**settings, **overrides})


class LiveServer:
    """uvicorn serving ``cfg`` in a thread on a free loopback port; ``url``, ``holder`` and ``app`` while open."""

    def __init__(self, cfg: ServeConfig, reader=None) -> None:
        self.holder = open_holder(cfg, reader)
        self.app = create_app(cfg, self.holder, reader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
