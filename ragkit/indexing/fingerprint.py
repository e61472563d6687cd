"""Which encoder made an index: its settings and fingerprints, so vectors of two encoders never mix.

A tower's fingerprint is the SHA-256 of its weights files (``*.safetensors``, ``*.bin``) together with
everything else that changes its vectors: pooling, normalisation, similarity and the tower's maximum
length. The passage fingerprint decides whether new passages may join an index; the query fingerprint
whether queries may search it. A trained retriever (``retriever.json``) has its two tower directories; a
plain Hugging Face model directory (or an alias such as ``minilm``) is one model serving both towers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ..artifacts import hash_file
from ..errors import RagkitError
from ..retriever.encoder import (PASSAGE_DIR, QUERY_DIR, SIMILARITIES, SPEC_FILE, BiEncoder, RetrieverSpec,
                                 load_tokenizer, resolve_model_path)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_SPEC = RetrieverSpec()


def weights_hash(directory: str | Path) -> str:
    """``sha256:<hex>`` over the names and contents of a model directory's weights files."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise RagkitError(f"{directory}: holds no weights file (*.safetensors or *.bin); pass a complete model directory")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hash_file(path).encode())
    return f"sha256:{digest.hexdigest()}"


def tower_fingerprint(weights: str, pooling: str, normalize: bool, similarity: str, max_length: int) -> str:
    settings = {"weights": weights, "pooling": pooling, "normalize": normalize, "similarity": similarity,
                "max_length": max_length}
    return "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class EncoderSettings:
    """How an index's vectors were made; stored in its manifest and in every version."""

    model: str
    """The model as given (a trained retriever, a model directory or an alias)."""
    path: str
    """The resolved local directory."""
    pooling: str
    normalize: bool
    similarity: str
    query_max_length: int
    passage_max_length: int
    dimension: int
    query_fingerprint: str
    passage_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSettings":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

    def check_passages(self, built: "EncoderSettings", source: str | Path) -> None:
        """Refuse to add this encoder's passage vectors to an index ``built`` by another encoder."""
        self._check(built, source, "passage_fingerprint", "its passages")

    def check_queries(self, built: "EncoderSettings", source: str | Path) -> None:
        """Refuse to search an index ``built`` by another encoder with this encoder's queries."""
        self._check(built, source, "query_fingerprint", "it")

    def _check(self, built: "EncoderSettings", source: str | Path, field: str, what: str) -> None:
        if self.dimension != built.dimension:
            raise RagkitError(
                f"{source}: holds {built.dimension}-dimensional vectors, the model {self.model} makes {self.dimension} "
                f"(use the model that built the index: {built.model})"
            )
        if getattr(self, field) != getattr(built, field):
            raise RagkitError(
                f"{source}: was built by another encoder ({built.model}) than {self.model} ({field} differs); "
                f"use the model that built {what}, or build a new index"
            )


def load_encoder(
    model: str,
    similarity: str | None = None,
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
) -> tuple[BiEncoder, Any, EncoderSettings]:
    """The encoder, its tokenizer and its settings; ``None`` settings come from the retriever's
    ``retriever.json``, else the training defaults (dot product, 32 query and 128 passage tokens)."""
    path = Path(resolve_model_path(model))
    spec = RetrieverSpec.load(path) if (path / SPEC_FILE).is_file() else DEFAULT_SPEC
    similarity = similarity or spec.similarity
    if similarity not in SIMILARITIES:
        raise RagkitError(f"similarity={similarity!r} is not one of {', '.join(SIMILARITIES)}")
    query_max_length = query_max_length or spec.query_max_length
    passage_max_length = passage_max_length or spec.passage_max_length
    encoder = BiEncoder.from_pretrained(str(path))
    tokenizer = load_tokenizer(str(path))
    if (path / SPEC_FILE).is_file():
        query_dir, passage_dir = path / QUERY_DIR, path / PASSAGE_DIR
    else:
        query_dir = passage_dir = path
    settings = EncoderSettings(
        model=str(model), path=str(path.resolve()), pooling=encoder.pooling, normalize=encoder.normalize,
        similarity=similarity, query_max_length=query_max_length, passage_max_length=passage_max_length,
        dimension=encoder.embedding_dim,
        query_fingerprint=tower_fingerprint(weights_hash(query_dir), encoder.pooling, encoder.normalize, similarity,
                                            query_max_length),
        passage_fingerprint=tower_fingerprint(weights_hash(passage_dir), encoder.pooling, encoder.normalize, similarity,
                                              passage_max_length),
    )
    return encoder, tokenizer, settings
