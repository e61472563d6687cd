"""Configs of the reader stages: ``ragkit train reader`` and ``ragkit answer`` (see :mod:`ragkit.config`)."""

from __future__ import annotations

import dataclasses

from ..config import _check_choice, _check_encoding, _check_positive
from ..errors import RagkitError
from ..indexing.retrieval import MODES as RETRIEVAL_MODES
from .marginalize import MARGINALS

DECODINGS = ("greedy", "beam", "thorough", "fast")


def _check_retrieval(cfg: object) -> None:
    _check_choice("retrieval", cfg.retrieval, RETRIEVAL_MODES)
    if cfg.retrieval != "dense" and not cfg.bm25:
        raise RagkitError(f"--retrieval {cfg.retrieval} needs --bm25 with the `ragkit mine` artifact of the index's ingest artifact")
    if cfg.retrieval == "hybrid" and cfg.alpha is None:
        raise RagkitError("--retrieval hybrid needs --alpha: a number, or the `ragkit hybrid` artifact that tuned it")


@dataclasses.dataclass
class TrainReaderConfig:
    """``ragkit train reader``: an index + a generator -> a RAG reader (generator and query tower trained)."""

    index: str = ""
    """The index artifact to retrieve from (its passage vectors stay fixed)."""
    out: str = "artifacts/reader"
    generator: str = "smollm2"
    """A seq2seq (BART-like) or causal LM directory, or an alias (smollm2)."""
    query_model: str | None = None
    """The query tower to start from; None: the index's own encoder (another must match its query fingerprint)."""
    marginal: str = "sequence"
    """sequence (RAG-Sequence) | token (RAG-Token)."""
    n_docs: int = 5
    """Passages retrieved per question."""
    temperature: float | None = None
    """Prior ``softmax(q.d / temperature)``; None: the retriever's training temperature (0.05 for normalised vectors)."""
    retrieval: str = "dense"
    """dense | bm25 | hybrid: which passages are read (their prior is q.d in every mode)."""
    bm25: str | None = None
    """The mine artifact whose BM25 index serves bm25 and hybrid retrieval."""
    alpha: str | None = None
    """Hybrid weight of BM25: a number or a `ragkit hybrid` artifact."""
    split: str = "train"
    """Question split trained on."""
    eval_split: str | None = None
    """Split answered to keep the best checkpoint; None: validation when the ingest artifact has it, else dev."""
    eval_max_questions: int = 100
    """Evaluation questions (a seeded sample; 0: all)."""
    eval_every: int = 0
    """Steps between evaluations (0: only before and after training)."""
    max_train_questions: int = 0
    """Train on a seeded sample of this many questions (0: all)."""
    batch_size: int = 4
    epochs: float = 1.0
    max_steps: int = 0
    """Stop after this many steps (0: run the epochs)."""
    lr: float = 3e-5
    warmup: float = 0.1
    """Warm-up: a fraction of the steps (< 1) or a number of steps."""
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    freeze_query_encoder: bool = False
    """Train the generator only (the query tower then keeps the index's scores)."""
    max_input_length: int = 256
    """Generator input tokens per (question, passage) pair; a longer passage loses its end."""
    gradient_checkpointing: bool = False
    """Recompute the generator's activations in the backward pass: far less memory for about a third more time."""
    max_new_tokens: int = 16
    """Longest answer decoded during evaluation."""
    decoding: str | None = None
    """Decoding of the evaluation answers: greedy | beam | thorough | fast; None: the marginal's own."""
    precision: str = "auto"
    device: str = "auto"
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none); `--resume` continues from the latest one."""
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    recall_window: int = 20
    """Training batches whose retrieval recall is averaged to watch for a collapse."""

    def __post_init__(self) -> None:
        if not self.index:
            raise RagkitError("no index artifact given (pass the output directory of `ragkit index`)")
        self.index, self.out, self.generator = str(self.index), str(self.out), str(self.generator)
        _check_choice("marginal", self.marginal, MARGINALS)
        _check_retrieval(self)
        _check_encoding(self)
        for name in ("n_docs", "batch_size", "lr", "max_input_length", "max_new_tokens", "recall_window", "epochs"):
            _check_positive(name, getattr(self, name))
        for name in ("eval_max_questions", "eval_every", "max_train_questions", "max_steps", "warmup", "weight_decay",
                     "max_grad_norm", "checkpoint_every"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.temperature is not None:
            _check_positive("temperature", self.temperature)
        if self.decoding is not None:
            _check_choice("decoding", self.decoding, DECODINGS)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RagkitError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")


@dataclasses.dataclass
class AnswerConfig:
    """``ragkit answer``: questions -> answers read from retrieved passages (or none: ``n_docs=0``)."""

    reader: str = "smollm2"
    """A `ragkit train reader` artifact, or a generator directory / alias (then the index's own query tower)."""
    index: str | None = None
    """The index artifact to retrieve from (not needed with n_docs=0)."""
    version: str | None = None
    """Index version (default: current)."""
    question: str | None = None
    """One question: print its answer and passages."""
    split: str | None = None
    """A question split of the index's ingest artifact to answer."""
    questions: str | None = None
    """A jsonl file of questions (`question`, optional `id` and `answers`)."""
    out: str | None = None
    """Where the predictions artifact goes (split / file mode)."""
    n_docs: int = 5
    """Passages per question; 0: closed-book (the generator alone)."""
    decoding: str | None = None
    """greedy | beam (RAG-Token) | thorough | fast (RAG-Sequence); None: the reader's marginal's own."""
    num_beams: int = 1
    """Beams per search (beam decoding: at least 2, default 4)."""
    max_new_tokens: int = 16
    retrieval: str = "dense"
    bm25: str | None = None
    alpha: str | None = None
    max_questions: int = 0
    """Answer a seeded sample of this many questions (0: all)."""
    batch_size: int = 8
    max_input_length: int | None = None
    """Generator input tokens per pair; None: the reader's own (300 for a plain generator)."""
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        sources = [name for name in ("question", "split", "questions") if getattr(self, name)]
        if len(sources) != 1:
            raise RagkitError("pass exactly one of a QUESTION, --split or --questions FILE")
        if self.question is None and not self.out:
            raise RagkitError("--split / --questions write predictions: pass --out DIR")
        _check_positive("n_docs", self.n_docs, allow_zero=True)
        if self.n_docs and not self.index:
            raise RagkitError("answers from passages need --index (or --n-docs 0 for the closed-book baseline)")
        if self.split and not self.index:
            raise RagkitError("--split reads the index's ingest artifact: pass --index")
        if self.decoding is not None:
            _check_choice("decoding", self.decoding, DECODINGS)
        _check_retrieval(self)
        _check_encoding(self)
        for name in ("num_beams", "max_new_tokens"):
            _check_positive(name, getattr(self, name))
        _check_positive("max_questions", self.max_questions, allow_zero=True)
