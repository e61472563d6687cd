"""A few dozen passages, their questions and tiny BERT encoders for the index tests (CPU, seeded)."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from ragkit.artifacts import Manifest, artifact_input
from ragkit.retriever.encoder import BiEncoder, RetrieverSpec, load_tokenizer, tokenize_passages, tokenize_queries

TOPICS = 14
COMMON = [f"c{i}" for i in range(12)]


def topic_words(topic: int) -> list[str]:
    return [f"w{topic}x{j}" for j in range(6)]


def vocabulary() -> list[str]:
    words = {w for t in range(TOPICS + 6) for w in topic_words(t)} | {f"ans{t}" for t in range(TOPICS + 6)}
    words |= {f"title{t}" for t in range(TOPICS + 6)} | set(COMMON) | {"which", "new", "changed"}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


def corpus() -> tuple[list[dict], dict[str, list[dict]]]:
    """Three passages per topic of different lengths (the first holds the answer); one question per topic."""
    rng = random.Random(0)
    passages, splits = [], {"train": [], "dev": []}
    for t in range(TOPICS):
        for k in range(3):
            words = rng.sample(topic_words(t), 2 + k) + rng.sample(COMMON, 1 + 2 * k) + ([f"ans{t}"] if k == 0 else [])
            passages.append({"id": f"p{t}-{k}", "title": f"title{t}", "text": " ".join(words), "doc_id": f"d{t}"})
    for t in range(TOPICS):
        splits["dev" if t % 3 == 0 else "train"].append({
            "id": f"q{t}", "question": " ".join(["which"] + rng.sample(topic_words(t), 3)), "answers": [f"ans{t}"],
            "positive_ids": [f"p{t}-0"], "hard_negative_ids": [], "doc_ids": [f"d{t}"], "doc_scores": [1],
        })
    return passages, splits


def write_ingest(root: Path, passages: list[dict] | None = None, name: str = "ingest") -> Path:
    default_passages, splits = corpus()
    passages = default_passages if passages is None else passages
    out = root / name
    datasets.Dataset.from_list(passages).save_to_disk(str(out / "passages"))
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).save_to_disk(str(out / "questions" / split))
    Manifest(stage="ingest", counts={"passages": len(passages)}).save(out)
    return out


def write_mine(root: Path, ingest: Path) -> Path:
    out = root / "mine"
    out.mkdir()
    Manifest(stage="mine", inputs=[artifact_input(ingest)]).save(out)
    return out


def write_tiny_model(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer BERT over the corpus' words (no dropout), with its tokenizer; mean pooling + normalise."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


def write_retriever(root: Path, model_dir: Path, mine: Path, similarity: str = "dot") -> Path:
    """A `train-retriever` artifact holding the tiny model untrained, with two separate towers."""
    out = root / "retriever"
    encoder = BiEncoder.from_pretrained(str(model_dir), shared=False, pooling="cls", normalize=False)
    spec = RetrieverSpec(shared=False, pooling="cls", normalize=False, similarity=similarity, query_max_length=16,
                         passage_max_length=24)
    encoder.save_pretrained(out, load_tokenizer(str(model_dir)), spec)
    Manifest(stage="train-retriever", inputs=[artifact_input(mine)]).save(out)
    return out


def direct_passage_vectors(model_dir: str | Path, passages: list[dict], max_length: int = 128) -> np.ndarray:
    """The encoder's own forward over every passage at once, float32, no autocast: ``(P, D)``."""
    encoder = BiEncoder.from_pretrained(str(model_dir)).eval()
    inputs = tokenize_passages(load_tokenizer(str(model_dir)), [p["title"] for p in passages],
                               [p["text"] for p in passages], max_length)
    with torch.no_grad():
        return encoder(**inputs, tower="passage").numpy()


def direct_query_vectors(model_dir: str | Path, questions: list[str], max_length: int = 32) -> np.ndarray:
    encoder = BiEncoder.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return encoder(**tokenize_queries(load_tokenizer(str(model_dir)), questions, max_length), tower="query").numpy()


def brute_force(queries: np.ndarray, passages: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with a plain sort: rows ``(Q, k)`` and scores ``(Q, k)``."""
    scores = queries.astype(np.float64) @ passages.astype(np.float64).T  # (Q, P)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def invoke(*args):
    """Run one ``ragkit`` command in-process and check it succeeded; its result."""
    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def build_indexed(root: Path) -> dict[str, Path]:
    """An ingest artifact, a tiny model, its BM25 mine artifact and a float32 Flat index, through the CLI."""
    ingest = write_ingest(root)
    model = write_tiny_model(root / "tiny")
    invoke("mine", ingest, "--out", root / "mine", "--depth", 20)
    invoke("index", "build", ingest, "--model", model, "--out", root / "index", "--device", "cpu", "--precision", "fp32")
    return {"root": root, "ingest": ingest, "model": model, "mine": root / "mine", "index": root / "index"}
