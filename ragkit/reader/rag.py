"""The RAG reader: a query tower that retrieves from a fixed index, and a generator that reads the passages.

:class:`RagReader` holds the two trainable parts of Lewis et al. (2020): the query encoder and the
generator. The index (passage vectors, FAISS, texts) is not part of it: every call takes a
:class:`~ragkit.indexing.retrieval.PassageRetriever` over one index version, so an index can be swapped
(updated, rolled back) under a reader without retraining it.

* **Scores.** A question's vector ``q`` ``(D,)`` comes from the query tower (with a gradient when the
  tower is trained); its passages' vectors ``d`` ``(K, D)`` are read from the index and stay fixed; the
  prior ``log p(z|x) = log_softmax(q.d / temperature)`` (the temperature the retriever was trained at:
  normalised vectors' scores lie in [-1, 1], which would make a flat prior) is the only path of the gradient into the query tower (cosine
  indexes compare normalised vectors, which the towers already output when they normalise). Whatever
  the retrieval mode (dense, BM25 or hybrid picks the passages), the prior is ``q.d``.
* **Loss** (:meth:`RagReader.loss`): RAG-Sequence or RAG-Token (:mod:`ragkit.reader.marginalize`) of the
  question's first answer.
* **Answers** (:meth:`RagReader.answer`): ``greedy`` / ``beam`` decode RAG-Token's marginal at every step;
  ``thorough`` / ``fast`` are RAG-Sequence's decodings (:mod:`ragkit.reader.decode`), greedy per passage
  unless ``num_beams > 1``. ``n_docs=0`` is the closed-book baseline: the generator reads the question
  alone.

A ``train reader`` artifact is a directory::

    reader.json          ReaderSpec: marginal, generator kind, the query tower's settings, the index it
                         was trained against (its passage fingerprint)
    generator/           the generator (save_pretrained + tokenizer): transformers loads it as is
    query_encoder/       the query tower (save_pretrained + tokenizer + sentence-transformers modules)

:meth:`RagReader.load` also takes a plain generator directory or alias (``smollm2``) with an index, for
zero-shot answers: the query tower is then the index's own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..answers import has_answer
from ..artifacts import write_json_atomic
from ..errors import RagkitError
from ..indexing.encode import resolve_device, resolve_precision
from ..indexing.fingerprint import EncoderSettings, load_encoder, tower_fingerprint, weights_hash
from ..indexing.retrieval import PassageRetriever, Retrieved, check_passage_tower
from ..indexing.versions import IndexVersion
from ..retriever.encoder import SPEC_FILE, BiEncoder, RetrieverSpec, autocast, load_tokenizer, tokenize_queries, write_sentence_transformers_modules
from .config import DECODINGS
from .decode import DecodingOptions, generate, rag_sequence_decode, rag_token_decode
from .generator import Generator, load_generator
from .marginalize import MARGINALS, passage_log_probs, rag_loss

READER_FILE = "reader.json"
GENERATOR_DIR = "generator"
QUERY_DIR = "query_encoder"
DEFAULT_DECODING = {"token": "greedy", "sequence": "thorough"}
"""Each marginal's own decoding: RAG-Token's marginal at every step, RAG-Sequence's thorough search."""


@dataclasses.dataclass
class ReaderSpec:
    """What a ``train reader`` artifact holds and the index it reads; saved as ``reader.json``."""

    marginal: str
    generator_kind: str
    max_input_length: int
    chat: bool | None
    pooling: str
    normalize: bool
    similarity: str
    query_max_length: int
    passage_max_length: int
    dimension: int
    passage_fingerprint: str
    """The passage tower of the index the query tower was trained against."""
    temperature: float
    """``p(z|x) = softmax(q.d / temperature)``."""
    index_encoder: str
    """That index's encoder, as it was named."""

    def __post_init__(self) -> None:
        if self.marginal not in MARGINALS:
            raise RagkitError(f"marginal={self.marginal!r} is not one of {', '.join(MARGINALS)}")

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / READER_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> "ReaderSpec":
        target = Path(directory) / READER_FILE
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise RagkitError(f"{directory}: no {READER_FILE}, not a reader (pass the output of `ragkit train reader`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise RagkitError(f"{target}: unreadable ({str(exc).splitlines()[0]}); retrain the reader") from None


@dataclasses.dataclass
class Prediction:
    """One question's answer and the passages it was read from."""

    question: str
    answer: str
    log_prob: float | None
    """The decoding's ``log p(y|x)`` (RAG-Token's or RAG-Sequence's marginal; the generator's alone, closed-book)."""
    passages: list[dict[str, Any]]
    """Best first: ``id``, ``title``, ``text``, ``score`` (the retrieval's), ``doc_score`` (``q.d``),
    ``prior`` (``p(z|x)``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_reader(path: str | Path) -> bool:
    return (Path(path) / READER_FILE).is_file()


class RagReader:
    """Query tower + generator (module docstring). Build with :meth:`load`."""

    def __init__(self, encoder: BiEncoder | None, tokenizer: Any, settings: EncoderSettings | None, generator: Generator, *,
                 marginal: str = "token", temperature: float = 1.0, autocast_dtype: torch.dtype | None = None,
                 source: str = "") -> None:
        if marginal not in MARGINALS:
            raise RagkitError(f"marginal={marginal!r} is not one of {', '.join(MARGINALS)}")
        if encoder is not None and encoder.passage_model is not None:  # the passage vectors come from the index: one tower is enough
            encoder = BiEncoder(encoder.query_model, None, pooling=encoder.pooling, normalize=encoder.normalize)
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.settings = settings
        self.generator = generator
        self.marginal = marginal
        if not temperature > 0:
            raise RagkitError(f"temperature={temperature!r} must be > 0")
        self.temperature = float(temperature)
        self.autocast_dtype = autocast_dtype
        self.source = source

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, *, index: str | Path | None = None, version: str | None = None, device: str = "auto",
             precision: str = "auto", marginal: str | None = None, max_input_length: int | None = None,
             chat: bool | None = None, query_model: str | None = None, temperature: float | None = None,
             training: bool = False) -> "RagReader":
        """A ``train reader`` artifact, or a generator directory / alias read with ``index``'s own query tower.

        ``index`` is checked against a reader artifact (its passage tower must be the one the reader was
        trained against) and required for a plain generator, whose query tower is ``query_model`` (default:
        the encoder that built the index; another must have the same query fingerprint).
        """
        torch_device = resolve_device(device)
        dtype = resolve_precision(precision, torch_device)
        weights = None if training else dtype
        if is_reader(path):
            spec = ReaderSpec.load(path)
            generator = load_generator(str(Path(path) / GENERATOR_DIR), spec.max_input_length if max_input_length is None else max_input_length,
                                       torch_device, dtype=weights, chat=spec.chat if chat is None else chat)
            query_dir = Path(path) / QUERY_DIR
            encoder = BiEncoder.from_pretrained(str(query_dir), shared=True, pooling=spec.pooling, normalize=spec.normalize)
            settings = EncoderSettings(
                model=str(path), path=str(Path(path).resolve()), pooling=spec.pooling, normalize=spec.normalize,
                similarity=spec.similarity, query_max_length=spec.query_max_length,
                passage_max_length=spec.passage_max_length, dimension=encoder.embedding_dim,
                query_fingerprint=tower_fingerprint(weights_hash(query_dir), spec.pooling, spec.normalize,
                                                    spec.similarity, spec.query_max_length),
                passage_fingerprint=spec.passage_fingerprint,
            )
            reader = cls(encoder.to(torch_device), load_tokenizer(str(query_dir)), settings, generator,
                         marginal=marginal or spec.marginal, temperature=temperature or spec.temperature, autocast_dtype=dtype,
                         source=str(path))
            if index is not None:
                reader.check_index(index, version)
            return reader
        if index is None:  # closed-book answers only
            generator = load_generator(path, max_input_length or 300, torch_device, dtype=weights, chat=chat)
            return cls(None, None, None, generator, marginal=marginal or "token", autocast_dtype=dtype, source=str(path))
        built = IndexVersion.open(index, version).encoder
        encoder, tokenizer, settings = load_encoder(query_model or built.path, built.similarity, built.query_max_length, built.passage_max_length)
        settings.check_queries(built, index)
        generator = load_generator(path, max_input_length or 300, torch_device, dtype=weights, chat=chat)
        return cls(encoder.to(torch_device), tokenizer, settings, generator, marginal=marginal or "token",
                   temperature=temperature or encoder_temperature(settings), autocast_dtype=dtype, source=str(path))

    @property
    def default_decoding(self) -> str:
        return DEFAULT_DECODING[self.marginal]

    @property
    def query_model(self) -> tuple[BiEncoder, Any, EncoderSettings]:
        """What :meth:`PassageRetriever.open` takes as ``query_model`` to search with this reader's tower."""
        return self.encoder, self.tokenizer, self.settings

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def check_index(self, index: str | Path, version: str | None = None) -> None:
        """Refuse an index whose passage tower is not the one this reader's query tower was trained against."""
        check_passage_tower(self.settings, IndexVersion.open(index, version).encoder, index)

    def retriever(self, index: str | Path, version: str | None = None, **options: Any) -> PassageRetriever:
        """A :class:`PassageRetriever` over ``index`` searching with this reader's query tower."""
        if self.encoder is None:
            raise RagkitError(f"{self.source}: loaded without an index, it answers closed-book only (pass --index, or --n-docs 0)")
        return PassageRetriever.open(index, version, query_model=self.query_model, device=str(self.encoder_device), **options)

    @property
    def encoder_device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def spec(self, index_encoder: EncoderSettings) -> ReaderSpec:
        return ReaderSpec(
            marginal=self.marginal, generator_kind=self.generator.kind, max_input_length=self.generator.max_input_length,
            chat=getattr(self.generator, "chat", None), pooling=self.settings.pooling, normalize=self.settings.normalize,
            similarity=self.settings.similarity, query_max_length=self.settings.query_max_length,
            passage_max_length=self.settings.passage_max_length, dimension=self.settings.dimension,
            passage_fingerprint=index_encoder.passage_fingerprint, temperature=self.temperature,
            index_encoder=index_encoder.model,
        )

    def save(self, directory: str | Path, index_encoder: EncoderSettings) -> None:
        """Write ``reader.json``, ``generator/`` and ``query_encoder/`` into ``directory``."""
        directory = Path(directory)
        generator_dir, query_dir = directory / GENERATOR_DIR, directory / QUERY_DIR
        generator_dir.mkdir(parents=True, exist_ok=True)
        query_dir.mkdir(parents=True, exist_ok=True)
        self.generator.model.save_pretrained(generator_dir)
        self.generator.tokenizer.save_pretrained(generator_dir)
        tower = self.encoder.query_model
        tower.save_pretrained(query_dir)
        self.tokenizer.save_pretrained(query_dir)
        if self.settings.pooling != "dpr":
            write_sentence_transformers_modules(query_dir, tower.config.hidden_size, self.settings.pooling,
                                                self.settings.normalize, self.settings.query_max_length)
        self.spec(index_encoder).save(directory)

    # -- scores and loss ------------------------------------------------------------------------------

    def query_vectors(self, questions: Sequence[str]) -> Tensor:
        """The query tower's vectors ``(B, D)`` float32, with a gradient where the tower requires one."""
        if self.encoder is None:
            raise RagkitError(f"{self.source}: loaded without an index, it answers closed-book only (pass --index, or --n-docs 0)")
        inputs = tokenize_queries(self.tokenizer, list(questions), self.settings.query_max_length)
        device = self.encoder_device
        with autocast(device, self.autocast_dtype):
            vectors = self.encoder.encode_query(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
        return vectors.float()  # (B, D)

    def doc_scores(self, query_vectors: Tensor, retriever: PassageRetriever, found: Sequence[Retrieved]) -> Tensor:
        """The prior's logits ``q.d / temperature`` of each question's passages: ``(B, D)`` -> ``(B, K)``.

        The passage vectors are constants read from the index.
        """
        rows = np.stack([f.rows for f in found])  # (B, K)
        passages = torch.from_numpy(retriever.passage_vectors(rows)).to(query_vectors.device)  # (B, K, D)
        return torch.einsum("bd,bkd->bk", query_vectors, passages) / self.temperature  # (B, K)

    def retrieve(self, questions: Sequence[str], retriever: PassageRetriever, n_docs: int) -> tuple[list[Retrieved], Tensor]:
        """Each question's ``n_docs`` passages and the prior's logits ``(B, K)`` (with the tower's gradient)."""
        vectors = self.query_vectors(questions)  # (B, D)
        found = retriever.retrieve(questions, n_docs, query_vectors=vectors.detach().cpu().numpy())
        return found, self.doc_scores(vectors, retriever, found)

    def loss(self, questions: Sequence[str], answers: Sequence[str], retriever: PassageRetriever, n_docs: int,
             epsilon: float = 0.0) -> tuple[Tensor, list[Retrieved]]:
        """The summed RAG loss of ``B`` questions' answers, and what was retrieved for them."""
        found, doc_scores = self.retrieve(questions, retriever, n_docs)  # doc_scores: (B, K)
        inputs = self.generator.encode(questions, [f.passages() for f in found])  # B * K rows
        targets = self.generator.encode_answers(answers)  # (B, T)
        with autocast(self.device, self.autocast_dtype):
            token_log_probs = self.generator.token_log_probs(inputs, targets.repeat_interleave(n_docs))  # (B * K, T, V)
        loss = rag_loss(doc_scores.to(token_log_probs.device), token_log_probs, targets.ids.to(token_log_probs.device),
                        targets.mask.to(token_log_probs.device), self.marginal, epsilon, reduce=True)
        return loss, found

    # -- answers --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def answer(self, questions: Sequence[str], retriever: PassageRetriever | None, n_docs: int, decoding: str | None = None,
               options: DecodingOptions | None = None) -> list[Prediction]:
        """Answers to ``questions`` from ``n_docs`` passages each (``n_docs=0``: closed-book, no retriever needed)."""
        questions = list(questions)
        decoding = decoding or self.default_decoding
        if decoding not in DECODINGS:
            raise RagkitError(f"decoding={decoding!r} is not one of {', '.join(DECODINGS)}")
        options = options or DecodingOptions(num_beams=4 if decoding == "beam" else 1)
        if decoding == "beam" and options.num_beams < 2:
            options = dataclasses.replace(options, num_beams=4)
        if n_docs == 0:
            with autocast(self.device, self.autocast_dtype):
                found = generate(self.generator, self.generator.encode_closed_book(questions), options)
            return [Prediction(q, self.generator.decode_text(h[0].tokens), h[0].log_prob, []) for q, h in zip(questions, found)]
        if retriever is None:
            raise RagkitError("answers from passages need an index: pass --index (or --n-docs 0 for closed-book)")
        found, doc_scores = self.retrieve(questions, retriever, n_docs)  # doc_scores: (B, K)
        inputs = self.generator.encode(questions, [f.passages() for f in found])
        with autocast(self.device, self.autocast_dtype):
            if decoding in ("greedy", "beam"):
                best = [(h.tokens, h.log_prob) for h in rag_token_decode(self.generator, inputs, doc_scores, options)]
            else:
                best = [(a.tokens, a.log_prob) for a in rag_sequence_decode(self.generator, inputs, doc_scores, options, method=decoding)]
        priors = passage_log_probs(doc_scores).exp().tolist()  # (B, K)
        predictions = []
        for question, (tokens, log_prob), retrieved, scores, prior in zip(questions, best, found, doc_scores.tolist(), priors):
            passages = [
                {**p, "score": float(s), "doc_score": float(d) * self.temperature, "prior": float(z)}
                for p, s, d, z in zip(retrieved.passages(), retrieved.scores, scores, prior)
            ]
            predictions.append(Prediction(question, self.generator.decode_text(tokens), float(log_prob), passages))
        return predictions


def encoder_temperature(settings: EncoderSettings) -> float:
    """The temperature a retriever was trained at (``retriever.json``), else 0.05 for normalised vectors
    (sentence-transformers' scale of 20) and 1 for raw dot products (DPR)."""
    path = Path(settings.path)
    if (path / SPEC_FILE).is_file():
        return RetrieverSpec.load(path).temperature
    return 0.05 if settings.normalize else 1.0


def retrieval_recall(found: Sequence[Retrieved], answers: Sequence[Sequence[str]]) -> float:
    """Fraction of questions with an answer string in one of their retrieved passages."""
    hits = [any(has_answer(golds, text) for text in f.texts) for f, golds in zip(found, answers)]
    return float(np.mean(hits)) if hits else 0.0

