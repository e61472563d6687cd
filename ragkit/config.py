"""Typed configuration, one dataclass per stage.

A config is resolved in three layers: the dataclass defaults, then a TOML file (``--config``), then the
flags given on the command line. Validation lives in ``__post_init__`` so a bad value fails before any
work starts. The resolved config is stored in the artifact's manifest.

A TOML file may hold the fields at top level or in a table named after the stage::

    [ingest]
    window = 100
    stride = 100
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from .errors import RagkitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

C = TypeVar("C")


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """The tables of a TOML file; ``missing`` says what to do when it does not exist."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RagkitError(f"{path}: {missing}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RagkitError(f"{path}: invalid TOML ({exc}); fix the syntax") from None


def load_config(cls: type[C], toml_path: str | Path | None = None, section: str | None = None, **overrides: Any) -> C:
    """Build ``cls`` from defaults < TOML file < keyword overrides (``None`` overrides are ignored)."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if toml_path is not None:
        toml_path = Path(toml_path)
        data = read_toml(toml_path, "config file not found (check the --config path)")
        if section is not None and isinstance(data.get(section), dict):
            data = data[section]
        for key, value in data.items():
            key = key.replace("-", "_")
            if key not in names:
                raise RagkitError(f"{toml_path}: unknown setting '{key}' for {cls.__name__} (known: {', '.join(sorted(names))})")
            values[key] = value
    for key, value in overrides.items():
        if value is not None:
            if key not in names:
                raise RagkitError(f"unknown setting '{key}' for {cls.__name__}")
            values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise RagkitError(f"{cls.__name__}: {exc}") from None


def as_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (paths as strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in dataclasses.asdict(config).items()}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise RagkitError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RagkitError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


INGEST_FORMATS = ("auto", "dpr", "beir", "squad", "jsonl", "msmarco")


@dataclasses.dataclass
class IngestConfig:
    """``ragkit ingest``: raw corpora and QA sets -> passages + questions."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    """Files or directories to read. A ``split=path`` form names the split of a question file."""
    out: str = "artifacts/ingest"
    format: str = "auto"
    window: int = 100
    """Words per passage window; 0 keeps each document whole."""
    stride: int = 0
    """Words between window starts; 0 means ``window`` (no overlap), < window overlaps."""
    dev_fraction: float = 0.0
    """Hold out this fraction of train questions as 'dev', grouped by document."""
    validation_fraction: float = 0.0
    """Then hold out this fraction of the remaining train questions as 'validation', grouped by document: the
    split that selects settings (hybrid alpha, checkpoints), so the reported dev split is never used to choose."""
    seed: int = 0
    dedup: bool = False
    """Drop repeated passage ids (keeping the first) instead of failing."""
    id_field: str = "id"
    title_field: str = "title"
    text_field: str = "text"
    question_field: str = "question"
    answers_field: str = "answers"
    positives_field: str = "positive_ids"
    strict: bool = False
    """Refuse the first SQuAD answer not exactly at its answer_start (default: relocate it when it lies within
    32 characters, and count it)."""
    qrels: list[str] = dataclasses.field(default_factory=list)
    """TREC (or BEIR) qrels files judging the questions of other inputs; ``split=path`` names the split judged."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_choice("format", self.format, INGEST_FORMATS)
        _check_positive("window", self.window, allow_zero=True)
        if self.window and self.stride == 0:
            self.stride = self.window
        if self.window and not 0 < self.stride <= self.window:
            raise RagkitError(f"stride={self.stride} must be in 1..window ({self.window})")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise RagkitError(f"dev_fraction={self.dev_fraction} must be in [0, 1)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise RagkitError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")
        self.inputs = [str(p) for p in self.inputs]
        self.qrels = [str(p) for p in self.qrels]


PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_KINDS = ("dpr", "gte")
GUIDE_MARGIN_STRATEGIES = ("none", "absolute", "relative")
SELECT_METRICS = ("auto", *(f"{m}@{k}" for m in ("accuracy", "recall") for k in (1, 5, 20, 100)), "mrr@10", "ndcg@10",
                  "doc_recall@100")


@dataclasses.dataclass
class TrainRetrieverConfig:
    """``ragkit train retriever``: mined examples -> a trained dual encoder."""

    mine: str = ""
    """The mine artifact to train on (its examples/train split; the dev questions for evaluation)."""
    out: str = "artifacts/retriever"
    model: str = "minilm"
    """Starting weights: an alias (minilm), a Hugging Face directory, a DPR question encoder, or a saved retriever."""
    passage_model: str | None = None
    """Starting weights of a separate passage tower (a DPR context encoder, or any model directory)."""
    shared: bool | None = None
    """One encoder for queries and passages; False trains two towers (DPR). None: separate when
    ``passage_model`` is given, else the saved retriever's own sharing, else shared."""
    pooling: str | None = None
    """cls | mean | dpr; None keeps the starting model's (mean for a plain Hugging Face model, dpr for DPR)."""
    normalize: bool | None = None
    """L2-normalise embeddings; None keeps the starting model's (off for DPR)."""
    similarity: str = "dot"
    temperature: float = 0.05
    loss: str = "dpr"
    """dpr: query->passage in-batch softmax; gte: adds query->query, passage->query, passage->passage."""
    query_max_length: int = 32
    passage_max_length: int = 128
    batch_size: int = 64
    """Questions per optimiser step, summed over all processes."""
    hard_negatives: int = 1
    """Mined negatives per question, rotated across epochs."""
    negative_offset: int = 0
    """Skip this many of each question's top-ranked mined negatives: the first BM25 ranks hold most of the
    relevant passages nobody labelled."""
    mask_known_positives: bool = True
    """Keep every passage labelled relevant to a question (its positives, the passages mining found to
    contain its answer) out of that question's in-batch negatives."""
    chunk_size: int = 0
    """> 0: gradient cache with sub-batches of this many rows (same gradients, less memory); 0: plain step."""
    epochs: int = 1
    max_steps: int = 0
    """> 0: stop after this many steps (epochs is then ignored)."""
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    """Linear warm-up: a fraction of the steps when < 1, else a number of steps; then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: str = "fp32"
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:N."""
    eval_every: int = 0
    """Evaluate on the dev split every this many steps (0: only at the end)."""
    eval_max_passages: int = 50_000
    """Cap on the passages encoded for evaluation; the capped set keeps every dev positive and BM25 candidate."""
    eval_batch_size: int = 128
    select_metric: str = "auto"
    """Dev metric that picks the kept model; auto: top-20 accuracy, or nDCG@10 when questions have no answers."""
    checkpoint_every: int = 0
    """Save resumable state every this many steps (0: never)."""
    resume: bool = False
    seed: int = 0
    guide: str | None = None
    """GIST: a frozen guide model whose similarities mask in-batch false negatives."""
    guide_margin_strategy: str = "absolute"
    guide_margin: float = 0.0
    negative_cache: int = 0
    """> 0: keep this many passage embeddings from earlier steps as extra negatives."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.mine:
            raise RagkitError("no mine artifact given (pass the output directory of `ragkit mine`)")
        self.mine, self.out = str(self.mine), str(self.out)
        self.passage_model = str(self.passage_model) if self.passage_model else None
        if self.passage_model and self.shared:
            raise RagkitError("passage_model starts a separate passage tower, it does not combine with shared=True (drop --shared)")
        _check_choice("similarity", self.similarity, ("dot", "cos"))
        _check_choice("loss", self.loss, LOSS_KINDS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("guide_margin_strategy", self.guide_margin_strategy, GUIDE_MARGIN_STRATEGIES)
        _check_choice("select_metric", self.select_metric, SELECT_METRICS)
        if self.pooling is not None:
            _check_choice("pooling", self.pooling, ("cls", "mean", "dpr"))
        for name in ("temperature", "lr", "query_max_length", "passage_max_length", "batch_size", "eval_batch_size",
                     "eval_max_passages"):
            _check_positive(name, getattr(self, name))
        for name in ("hard_negatives", "negative_offset", "chunk_size", "epochs", "max_steps", "weight_decay", "warmup",
                     "max_grad_norm", "eval_every", "checkpoint_every", "negative_cache", "guide_margin"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.epochs == 0 and self.max_steps == 0:
            raise RagkitError("epochs=0 and max_steps=0: nothing to train (set --epochs or --max-steps)")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise RagkitError(f"device={self.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.negative_cache and self.guide:
            raise RagkitError(
                "negative_cache does not combine with guide: the guide would have to score every cached passage "
                "to mask the cache's softmax (drop one of them)"
            )


@dataclasses.dataclass
class ExportDprConfig:
    """``ragkit export dpr``: a trained retriever -> DPR's ``question_encoder/`` + ``ctx_encoder/`` layout."""

    retriever: str = ""
    """The trained retriever (output directory of ``ragkit train retriever``)."""
    out: str = "artifacts/dpr"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.retriever:
            raise RagkitError("no retriever given (pass the output directory of `ragkit train retriever`)")
        self.retriever, self.out = str(self.retriever), str(self.out)


BM25_BACKENDS = ("bm25s", "rank-bm25")
BM25_METHODS = ("robertson", "lucene")
MATCH_TYPES = ("string", "regex")
GIVEN_NEGATIVES = ("ignore", "first", "only")


@dataclasses.dataclass
class MineConfig:
    """``ragkit mine``: ingest artifact -> BM25 runs, positives and hard negatives per question."""

    ingest: str = ""
    """The ingest artifact to mine (its passages and every questions split)."""
    out: str = "artifacts/mine"
    splits: list[str] = dataclasses.field(default_factory=list)
    """Question splits to mine; empty: all of them."""
    depth: int = 100
    """BM25 results per question (the run's depth and the pool hard negatives come from)."""
    negatives: int = 30
    """Hard negatives kept per question, in BM25 rank order."""
    random_negatives: int = 0
    """Uniformly drawn negatives per question (same filters as hard negatives)."""
    given_negatives: str = "ignore"
    """Hard negatives that came with the questions (DPR JSON ``hard_negative_ctxs``): ignore them, put them
    first and fill up with mined ones, or use only them. Given ones pass the same filters as mined ones."""
    seed: int = 0
    backend: str = "bm25s"
    """bm25s (fast) or rank-bm25 (the slow reference)."""
    method: str = "robertson"
    """robertson (== rank-bm25 BM25Okapi with epsilon=0) or lucene (Lucene's idf)."""
    k1: float = 1.5
    b: float = 0.75
    stopwords: bool = True
    """Drop Lucene's 33 English stop words."""
    stem: bool = False
    """Snowball English stemming (needs PyStemmer)."""
    match_type: str = "string"
    """How answers are found in passages: string (DPR token match) or regex (CuratedTREC)."""
    export_dpr: bool = False
    """Also write dpr/<split>.json in DPR's retriever training format."""
    chunk_size: int = 1000
    """Questions retrieved and written per step (bounds memory)."""
    workers: int = 0
    """Processes for answer matching and threads for BM25 top-k; 0: one per CPU core."""
    index_from: str | None = None
    """A mine artifact whose saved BM25 index to reuse (must cover the same passages with the same settings)."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.ingest:
            raise RagkitError("no ingest artifact given (pass the output directory of `ragkit ingest`)")
        self.ingest, self.out = str(self.ingest), str(self.out)
        self.index_from = str(self.index_from) if self.index_from else None
        self.splits = [str(s) for s in self.splits]
        _check_choice("backend", self.backend, BM25_BACKENDS)
        _check_choice("method", self.method, BM25_METHODS)
        _check_choice("match_type", self.match_type, MATCH_TYPES)
        _check_choice("given_negatives", self.given_negatives, GIVEN_NEGATIVES)
        if self.backend == "rank-bm25" and self.method != "robertson":
            raise RagkitError(f"method={self.method!r}: the rank-bm25 backend implements only 'robertson' (use --backend bm25s)")
        for name in ("depth", "chunk_size"):
            _check_positive(name, getattr(self, name))
        for name in ("negatives", "random_negatives", "workers", "k1"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.b <= 1.0:
            raise RagkitError(f"b={self.b} must be in [0, 1]")


@dataclasses.dataclass
class EvaluateConfig:
    """``ragkit evaluate``: one or several runs (mine, index, hybrid artifacts; run files) -> metrics per split."""

    artifact: str = ""
    """One artifact whose runs/<split>.trec to score (put first in ``runs``)."""
    out: str = "artifacts/evaluate"
    runs: list[str] = dataclasses.field(default_factory=list)
    """Runs to score side by side: artifact directories holding runs/, or ``name=path`` where path is an
    artifact directory or a TREC run file (named after its split, e.g. dev.trec, or given one --split)."""
    ingest: str | None = None
    """The ingest artifact with the questions; default: the one the artifacts were built from."""
    splits: list[str] = dataclasses.field(default_factory=list)
    """Splits to score; empty: every split each run has."""
    ks: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 20, 100])
    """Cut-offs for top-k accuracy and passage recall."""
    match_type: str = "string"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.runs = [str(r) for r in self.runs]
        if self.artifact:
            self.artifact = str(self.artifact)
            if self.artifact not in self.runs:
                self.runs.insert(0, self.artifact)
        if not self.runs:
            raise RagkitError("no artifact given (pass the output directory of `ragkit mine`, `ragkit index` or `ragkit hybrid`)")
        self.out = str(self.out)
        self.ingest = str(self.ingest) if self.ingest else None
        self.splits = [str(s) for s in self.splits]
        _check_choice("match_type", self.match_type, MATCH_TYPES)
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise RagkitError(f"ks={self.ks!r} must be a non-empty list of positive cut-offs")
        self.ks = sorted({int(k) for k in self.ks})


FUSION_METHODS = ("linear", "rrf")


def _alpha_grid() -> list[float]:
    """0, then 8 log-spaced values a decade from 0.001 to 100 (scores of the two runs can differ in scale)."""
    return [0.0] + [round(10 ** (e / 8), 6) for e in range(-24, 17)]


@dataclasses.dataclass
class HybridConfig:
    """``ragkit hybrid``: two artifacts holding runs (dense, BM25) -> fused runs."""

    dense: str = ""
    """Artifact with the first runs (mine, index or hybrid); its scores enter the fusion with weight 1."""
    bm25: str = ""
    """Artifact with the second runs; its scores are weighted by alpha."""
    out: str = "artifacts/hybrid"
    method: str = "linear"
    """linear: dense + alpha * bm25 (missing scores filled with the list's minimum); rrf: reciprocal rank fusion."""
    alpha: float | str = "tuned"
    """linear: a weight >= 0, or 'tuned': the grid value best on ``tune_split``."""
    normalize: bool = False
    """linear: min-max centre each list's scores first (pyserini's normalisation)."""
    rrf_k: float = 60.0
    splits: list[str] = dataclasses.field(default_factory=list)
    """Splits to fuse and report; empty: every split both artifacts have runs for, except the tune split."""
    depth: int = 100
    """Results kept from each run and in the fused run."""
    tune_split: str | None = None
    """Split alpha is tuned on (never reported); None: 'validation' when both artifacts have runs for it, else 'train'."""
    tune_metric: str = "auto"
    """Metric maximised; auto: top-20 accuracy, else nDCG@10, else recall@20 (what the questions allow)."""
    tune_max_questions: int = 2000
    """Tune on a seeded sample of at most this many questions."""
    alpha_grid: list[float] = dataclasses.field(default_factory=_alpha_grid)
    seed: int = 0
    match_type: str = "string"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.dense or not self.bm25:
            raise RagkitError("give two artifacts holding runs: DENSE_ARTIFACT BM25_ARTIFACT (outputs of `ragkit index`, `ragkit mine`)")
        self.dense, self.bm25, self.out = str(self.dense), str(self.bm25), str(self.out)
        _check_choice("method", self.method, FUSION_METHODS)
        _check_choice("tune_metric", self.tune_metric, SELECT_METRICS)
        _check_choice("match_type", self.match_type, MATCH_TYPES)
        if self.alpha != "tuned":
            try:
                self.alpha = float(self.alpha)
            except (TypeError, ValueError):
                raise RagkitError(f"alpha={self.alpha!r} must be a number >= 0 or 'tuned'") from None
            _check_positive("alpha", self.alpha, allow_zero=True)
            if self.method != "linear":
                raise RagkitError(f"alpha={self.alpha} weighs scores in linear fusion only; drop --alpha with --method {self.method}")
        for name in ("rrf_k", "depth", "tune_max_questions"):
            _check_positive(name, getattr(self, name))
        self.alpha_grid = sorted({float(a) for a in self.alpha_grid})
        if not self.alpha_grid or self.alpha_grid[0] < 0:
            raise RagkitError(f"alpha_grid={self.alpha_grid!r} must be a non-empty list of weights >= 0")
        self.splits = [str(s) for s in self.splits]
        self.tune_split = str(self.tune_split) if self.tune_split else None

    @property
    def tuned(self) -> bool:
        """Whether alpha is chosen on the tune split (linear fusion without a given alpha)."""
        return self.method == "linear" and self.alpha == "tuned"


INDEX_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EMBEDDING_DTYPES = ("float32", "float16")


def _check_encoding(cfg: Any) -> None:
    _check_choice("precision", cfg.precision, INDEX_PRECISIONS)
    _check_positive("batch_size", cfg.batch_size)
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise RagkitError(f"device={cfg.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


@dataclasses.dataclass
class IndexConfig:
    """``ragkit index build``: an encoder + an ingest artifact -> FAISS index, embeddings and dense runs."""

    ingest: str = ""
    """The ingest artifact whose passages to index (or a mine artifact: its ingest)."""
    out: str = "artifacts/index"
    model: str = "minilm"
    """The encoder: a `ragkit train retriever` artifact, a Hugging Face model directory, or an alias (minilm)."""
    splits: list[str] = dataclasses.field(default_factory=list)
    """Question splits to search and write runs for; empty: dev, when the ingest artifact has it."""
    depth: int = 100
    """Passages per question in the runs."""
    factory: str = "Flat"
    """FAISS index_factory string: Flat (exact), HNSW32, IVF4096,Flat, IVF4096,PQ64, ..."""
    train_sample: int = 262_144
    """Vectors sampled (seeded) to train IVF / PQ indexes."""
    nprobe: int = 64
    """IVF lists visited per query (at most all of them)."""
    ef_search: int = 128
    """HNSW beam width per query (raised to the depth asked for when smaller)."""
    similarity: str | None = None
    """dot | cos; None: the retriever's own (dot for a plain model)."""
    query_max_length: int | None = None
    """Query tokens kept; None: the retriever's own (32 for a plain model)."""
    passage_max_length: int | None = None
    """Passage tokens kept (title + text); None: the retriever's own (128 for a plain model)."""
    batch_size: int = 128
    precision: str = "auto"
    """auto (bf16 where the hardware has it) | fp32 | bf16 | fp16 (CUDA)."""
    dtype: str = "float32"
    """Stored embeddings: float32 | float16 (half the disk; searched as float32)."""
    device: str = "auto"
    shard: str | None = None
    """i/N: encode only shard i of N (rows [i*P/N, (i+1)*P/N)) into the work directory, then stop."""
    shards: int = 0
    """Shards of a new encoding; 0: about one per million passages, a multiple of the process count."""
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.ingest:
            raise RagkitError("no ingest artifact given (pass the output directory of `ragkit ingest` or `ragkit mine`)")
        self.ingest, self.out, self.model = str(self.ingest), str(self.out), str(self.model)
        self.splits = [str(s) for s in self.splits]
        _check_encoding(self)
        _check_choice("dtype", self.dtype, EMBEDDING_DTYPES)
        if self.similarity is not None:
            _check_choice("similarity", self.similarity, ("dot", "cos"))
        for name in ("depth", "train_sample", "nprobe", "ef_search"):
            _check_positive(name, getattr(self, name))
        for name in ("query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise RagkitError(f"{name}={value!r} must be >= 2 (room for [CLS] and [SEP])")
        _check_positive("shards", self.shards, allow_zero=True)
        if self.shard is not None:
            from .indexing.shards import Shard

            self.shard = str(self.shard)
            count = Shard.parse(self.shard).count
            if self.shards and self.shards != count:
                raise RagkitError(f"shard={self.shard!r} splits into {count} shards but shards={self.shards} (drop one of them)")


@dataclasses.dataclass
class IndexUpdateConfig:
    """``ragkit index update``: add, replace and delete passages by id as a new index version."""

    index: str = ""
    """The index artifact to update (output directory of `ragkit index`)."""
    add: str | None = None
    """jsonl of new passages {id, title, text}."""
    replace: str | None = None
    """jsonl of passages {id, title, text} whose text changes."""
    delete: str | None = None
    """Passage ids to delete, one a line."""
    model: str | None = None
    """The encoder; default: the one that built the index (another one is refused)."""
    batch_size: int = 128
    precision: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.index:
            raise RagkitError("no index given (pass the output directory of `ragkit index`)")
        self.index = str(self.index)
        for name in ("add", "replace", "delete", "model"):
            value = getattr(self, name)
            setattr(self, name, str(value) if value else None)
        _check_encoding(self)



@dataclasses.dataclass
class ServeConfig:
    """``ragkit serve``: answer questions over HTTP from the current version of an index artifact."""

    index: str = ""
    """The index artifact to serve (output directory of `ragkit index`); its `current` version is followed."""
    mine: str | None = None
    """The mine artifact of the index's ingest artifact: enables `bm25` and `hybrid` retrieval."""
    alpha: str | None = None
    """The hybrid's weight of BM25: a number or a `ragkit hybrid` artifact (enables `hybrid`)."""
    reader: str | None = None
    """A `train reader` artifact or a generator (directory or alias such as smollm2): enables /answer."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    """Requests answered together in one call."""
    batch_window_ms: float = 5.0
    """How long the first request of a batch waits for others to join it."""
    batching: bool = True
    """False: one request at a time (max_batch 1, no window)."""
    poll_seconds: float = 2.0
    """How often the `current` pointer is checked for a new version (0: only on POST /admin/reload)."""
    max_body_bytes: int = 65_536
    max_pending: int = 256
    """Requests queued or in a batch at once; more are answered 503."""
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.index:
            raise RagkitError("no index given (pass the output directory of `ragkit index`)")
        self.index = str(self.index)
        for name in ("mine", "alpha", "reader"):
            value = getattr(self, name)
            setattr(self, name, str(value) if value is not None else None)
        _check_encoding(self)
        if not 0 < self.port < 65536:
            raise RagkitError(f"port={self.port!r} must be in 1..65535")
        for name in ("max_batch", "max_body_bytes", "max_pending"):
            _check_positive(name, getattr(self, name))
        for name in ("batch_window_ms", "poll_seconds"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if not self.batching:
            self.max_batch, self.batch_window_ms = 1, 0.0

    @property
    def modes(self) -> tuple[str, ...]:
        """The retrieval modes this configuration can serve."""
        from .indexing.retrieval import MODES

        return tuple(m for m in MODES if m == "dense" or (self.mine and (m == "bm25" or self.alpha is not None)))
