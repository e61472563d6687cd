"""The dual encoder: a query tower and a passage tower (one shared model or two), pooled into vectors.

A query is encoded on its own; a passage is encoded as ``[CLS] title [SEP] text [SEP]`` through the
tokenizer's text-pair API, as DPR does. Segment ids stay zero, as in DPR, which also makes a passage's
ids identical to those of the single string ``"title [SEP] text"``.

A trained retriever is a directory::

    retriever.json        RetrieverSpec: sharing, pooling, normalisation, similarity, temperature, lengths
    query_encoder/        safetensors + config + tokenizer + sentence-transformers module files
    passage_encoder/      the same for the passage tower (a copy of the query tower when shared)

Each tower directory loads with ``transformers.AutoModel`` and with ``SentenceTransformer``, which then
reproduces :class:`BiEncoder`'s embeddings (the module files name the same pooling and normalisation).
Models are only ever read from local directories; short names map to packaged weights
(:data:`ragkit.model_paths.MODEL_ALIASES`).

DPR checkpoints (``DPRQuestionEncoder`` / ``DPRContextEncoder`` directories, ``model_type == "dpr"``) are
towers too, always as a pair: the question encoder as the query tower, the context encoder as the
passage tower. Their pooling is ``dpr``: the model's own ``pooler_output``, the [CLS] state of its BERT
through its ``encode_proj`` projection when ``projection_dim > 0``. Such towers are saved as DPR models
(they load with ``DPRQuestionEncoder`` / ``DPRContextEncoder``) and get no sentence-transformers files,
which could not reproduce the projection.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..artifacts import write_json_atomic
from ..errors import RagkitError
from ..model_paths import MODEL_ALIASES, SPEC_FILE, resolve_model_path  # noqa: F401  (part of this module's API)

POOLINGS: tuple[str, ...] = ("cls", "mean", "dpr")
SIMILARITIES: tuple[str, ...] = ("dot", "cos")
TOWERS: tuple[str, ...] = ("query", "passage")
QUERY_DIR = "query_encoder"
PASSAGE_DIR = "passage_encoder"
DPR_TOWERS: dict[str, str] = {"DPRQuestionEncoder": "query", "DPRContextEncoder": "passage"}
"""DPR's encoder classes -> the tower each one is trained to be."""
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")

@dataclasses.dataclass
class RetrieverSpec:
    """How a trained retriever encodes and scores; saved as ``retriever.json`` next to its towers."""

    shared: bool = True
    """One model encodes queries and passages (False: two towers)."""
    pooling: Literal["cls", "mean", "dpr"] = "mean"
    """``dpr``: the towers are DPR encoders and their ``pooler_output`` is the embedding."""
    normalize: bool = True
    """L2-normalise the pooled vectors."""
    similarity: Literal["dot", "cos"] = "dot"
    temperature: float = 0.05
    query_max_length: int = 32
    passage_max_length: int = 128

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise RagkitError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.similarity not in SIMILARITIES:
            raise RagkitError(f"similarity={self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if not self.temperature > 0:
            raise RagkitError(f"temperature={self.temperature!r} must be > 0")
        for name in ("query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise RagkitError(f"{name}={value!r} must be an integer >= 2 (room for [CLS] and [SEP])")

    def save(self, directory: str | Path) -> Path:
        target = Path(directory) / SPEC_FILE
        write_json_atomic(target, dataclasses.asdict(self))
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "RetrieverSpec":
        target = Path(directory) / SPEC_FILE
        if not target.is_file():
            raise RagkitError(f"{directory}: no {SPEC_FILE}, not a trained retriever (pass the output of `ragkit train retriever`)")
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RagkitError(f"{target}: unreadable ({exc}); retrain or restore this file") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known) if isinstance(data, dict) else None
        if unknown is None or unknown:
            raise RagkitError(
                f"{target}: unexpected content {unknown or type(data).__name__} (known keys: {', '.join(sorted(known))})"
            )
        try:
            return cls(**data)
        except RagkitError as exc:
            raise RagkitError(f"{target}: {exc}") from None


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Token states ``(B, L, H)`` -> one vector per row ``(B, H)``: the [CLS] state or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]  # (B, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    # The clamp only matters for an all-padding row, which would otherwise divide by zero.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)


class BiEncoder(nn.Module):
    """Query and passage towers behind one ``forward`` (so DDP wraps a single module).

    ``passage_model=None`` shares the query model's weights between the towers. Each tower runs the
    transformer, pools its last hidden states (``cls`` or mask-aware ``mean``), or takes a DPR encoder's
    ``pooler_output`` (``dpr``), and optionally L2-normalises the result.
    """

    def __init__(
        self,
        query_model: nn.Module,
        passage_model: nn.Module | None = None,
        pooling: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise RagkitError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        for model in (query_model, passage_model):
            if model is not None and (pooling == "dpr") != (model.config.model_type == "dpr"):
                raise RagkitError(
                    f"pooling={pooling!r} does not fit a {model.config.model_type} tower "
                    f"(DPR encoders pool with 'dpr', other models with 'cls' or 'mean')"
                )
        if passage_model is not None and embedding_width(passage_model) != embedding_width(query_model):
            raise ValueError(
                f"query tower width {embedding_width(query_model)} != passage tower width {embedding_width(passage_model)}"
            )
        self.query_model = query_model
        self.passage_model = passage_model
        self.pooling = pooling
        self.normalize = bool(normalize)

    @property
    def shared(self) -> bool:
        return self.passage_model is None

    @property
    def embedding_dim(self) -> int:
        return embedding_width(self.query_model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        tower: Literal["query", "passage"],
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Encode a tokenised batch ``(B, L)`` with the named tower -> ``(B, D)``."""
        if tower not in TOWERS:
            raise ValueError(f"tower={tower!r} is not one of {', '.join(TOWERS)}")
        model = self.query_model if tower == "query" or self.passage_model is None else self.passage_model
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        output = model(input_ids=input_ids, attention_mask=attention_mask, **segments)
        if self.pooling == "dpr":
            vectors = output.pooler_output  # (B, D): the [CLS] state, projected when the DPR config says so
        else:
            vectors = pool(output.last_hidden_state, attention_mask, self.pooling)  # (B, H)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def encode_query(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self(input_ids, attention_mask, tower="query")  # (B, D)

    def encode_passage(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self(input_ids, attention_mask, tower="passage")  # (B, D)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        shared: bool | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        passage_model: str | None = None,
    ) -> "BiEncoder":
        """Load a trained retriever directory, or start from plain Hugging Face model directories.

        A retriever directory (``retriever.json`` present) loads its towers with the spec's pooling and
        normalisation; ``shared=None`` keeps its sharing, ``shared=False`` unties a shared checkpoint into
        two towers. A plain directory loads one model, shared by default, or two copies of it with
        ``shared=False`` (DPR's setup); ``passage_model`` starts the passage tower from another directory
        (the towers are then separate). There, ``pooling=None`` / ``normalize=None`` are read from the
        sentence-transformers files (``modules.json``, ``1_Pooling/config.json``), else mean + normalise.
        A DPR question encoder needs its context encoder as ``passage_model``; the pair pools with ``dpr``
        and is not normalised unless ``normalize=True``.
        """
        path = Path(resolve_model_path(name_or_path))
        if (path / SPEC_FILE).is_file():
            if passage_model is not None:
                raise RagkitError(f"{path}: a trained retriever brings its own passage tower (drop --passage-model)")
            spec = RetrieverSpec.load(path)
            if shared and not spec.shared:
                raise RagkitError(f"{path}: holds two separate towers, they cannot be loaded as one shared tower (drop shared=True)")
            shared = spec.shared if shared is None else shared
            pooling = pooling or spec.pooling
            normalize = spec.normalize if normalize is None else normalize
            query_model = load_tower(path / QUERY_DIR)
            passage_tower = None if shared else load_tower(path / PASSAGE_DIR)
        else:
            passage_path = None if passage_model is None else Path(resolve_model_path(passage_model))
            shared, pooling, normalize = _starting_settings(path, passage_path, shared, pooling, normalize)
            query_model = load_tower(path)
            passage_tower = None if shared else load_tower(passage_path or path)
        try:
            return cls(query_model, passage_tower, pooling=pooling, normalize=normalize)
        except RagkitError as exc:
            raise RagkitError(f"{path}: {exc}") from None

    def save_pretrained(self, directory: str | Path, tokenizer: Any, spec: RetrieverSpec) -> None:
        """Write ``query_encoder/``, ``passage_encoder/`` and ``retriever.json`` into ``directory``.

        ``spec`` must describe this encoder (sharing, pooling, normalisation); a spec that disagrees would
        make the saved retriever load as a different model, so it is refused.
        """
        mismatched = [
            f"{name}={getattr(spec, name)!r} vs {getattr(self, name)!r}"
            for name in ("shared", "pooling", "normalize")
            if getattr(spec, name) != getattr(self, name)
        ]
        if mismatched:
            raise ValueError(f"spec disagrees with the encoder it describes: {', '.join(mismatched)}")
        directory = Path(directory)
        towers = (
            (QUERY_DIR, self.query_model, spec.query_max_length),
            (PASSAGE_DIR, self.passage_model if self.passage_model is not None else self.query_model, spec.passage_max_length),
        )
        for name, model, max_length in towers:
            target = directory / name
            target.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            if self.pooling != "dpr":
                write_sentence_transformers_modules(target, model.config.hidden_size, self.pooling, self.normalize, max_length)
        spec.save(directory)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The region a tower runs in: ``torch.autocast`` to ``dtype`` on ``device``, or nothing for full precision."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def embedding_width(model: nn.Module) -> int:
    """Width of a tower's vectors: a DPR encoder's projection when it has one, else the hidden size."""
    return getattr(model.config, "projection_dim", 0) or model.config.hidden_size


def dpr_tower(directory: str | Path) -> str | None:
    """``"query"`` / ``"passage"`` for a DPR question / context encoder directory, ``None`` for any other model."""
    config_file = Path(directory) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RagkitError(f"{config_file}: unreadable ({exc}); check the directory holds a complete model") from None
    if not isinstance(config, dict) or config.get("model_type") != "dpr":
        return None
    architectures = config.get("architectures") or []
    towers = {DPR_TOWERS[name] for name in architectures if name in DPR_TOWERS}
    if len(towers) != 1:
        raise RagkitError(
            f"{config_file}: a DPR model with architectures {architectures}, not one of {', '.join(DPR_TOWERS)} "
            f"(pass a DPR question or context encoder saved with save_pretrained)"
        )
    return towers.pop()


def _starting_settings(
    path: Path, passage_path: Path | None, shared: bool | None, pooling: str | None, normalize: bool | None
) -> tuple[bool, str, bool]:
    """Sharing, pooling and normalisation of towers started from plain model directories (see ``from_pretrained``)."""
    if passage_path is not None:
        if (passage_path / SPEC_FILE).is_file():
            raise RagkitError(
                f"{passage_path}: is a trained retriever, a passage model is one model directory (pass its {PASSAGE_DIR}/)"
            )
        if shared:
            raise RagkitError(f"{passage_path}: a passage model starts a separate passage tower (drop --shared)")
        shared = False
    if _check_dpr_pair(path, passage_path):
        if pooling not in (None, "dpr"):
            raise RagkitError(
                f"{path}: DPR encoders pool with their own [CLS] head, pooling={pooling!r} does not apply (drop --pooling)"
            )
        pooling, normalize = "dpr", bool(normalize)
    elif pooling is None or normalize is None:
        detected = sentence_transformers_pooling(path)
        if passage_path is not None and sentence_transformers_pooling(passage_path) not in ((None, None), detected):
            raise RagkitError(f"{passage_path}: pools or normalises unlike {path} (pass --pooling and --normalize explicitly)")
        detected_pooling, detected_normalize = detected
        pooling = pooling or detected_pooling or "mean"
        normalize = (True if detected_normalize is None else detected_normalize) if normalize is None else normalize
    return (True if shared is None else shared), pooling, normalize


def _check_dpr_pair(query_path: Path, passage_path: Path | None) -> bool:
    """Whether the starting towers are a DPR pair; refuses a lone DPR encoder, swapped towers and a mixed pair."""
    query_kind = dpr_tower(query_path)
    passage_kind = dpr_tower(passage_path) if passage_path is not None else None
    if query_kind == "passage":
        raise RagkitError(
            f"{query_path}: is a DPR context encoder, it encodes passages (pass it as --passage-model and the question encoder as --model)"
        )
    if passage_kind == "query":
        raise RagkitError(
            f"{passage_path}: is a DPR question encoder, it encodes queries (pass it as --model and the context encoder as --passage-model)"
        )
    if query_kind is not None and passage_path is None:
        raise RagkitError(
            f"{query_path}: is a DPR question encoder, its passages need the matching context encoder (add --passage-model CTX_DIR)"
        )
    if passage_path is not None and (query_kind is None) != (passage_kind is None):
        dpr_side, other = (query_path, passage_path) if query_kind else (passage_path, query_path)
        raise RagkitError(
            f"{dpr_side}: is a DPR encoder but {other} is not (start from a DPR question + context encoder pair, or two plain models)"
        )
    return query_kind is not None


def load_tower(directory: str | Path) -> nn.Module:
    """One transformer from a local directory, without the pooler head no tower uses.

    An unused pooler would hold parameters that never get a gradient, which DDP reports as an error. A DPR
    directory loads with the encoder class its config names (``AutoModel`` would make every DPR
    checkpoint a question encoder).
    """
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise RagkitError(f"{directory}: no config.json, not a model directory (pass a Hugging Face model directory)")
    tower = dpr_tower(directory)
    # Dropping the pooler is deliberate, so transformers' report of its unused weights (and the
    # per-load progress bar) would only be noise; both settings are restored afterwards.
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if tower is not None:
            dpr_class = next(name for name, kind in DPR_TOWERS.items() if kind == tower)
            return getattr(transformers, dpr_class).from_pretrained(directory, config=config, local_files_only=True)
        options: dict[str, Any] = {}
        model_class = MODEL_MAPPING.get(type(config), None)
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            options["add_pooling_layer"] = False
        return AutoModel.from_pretrained(directory, config=config, local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RagkitError(f"{directory}: cannot load the model ({first_line}); check the directory holds a complete model") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str, passage_model: str | None = None) -> Any:
    """The tokenizer of a model directory, alias, or trained retriever (its query tower's copy).

    One tokenizer serves both towers, so a ``passage_model`` directory that holds tokenizer files must
    hold the same vocabulary.
    """
    from transformers import AutoTokenizer

    path = Path(resolve_model_path(name_or_path))
    if (path / SPEC_FILE).is_file():
        path = path / QUERY_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RagkitError(f"{path}: cannot load the tokenizer ({first_line}); check the directory holds tokenizer files") from None
    passage_path = None if passage_model is None else Path(resolve_model_path(passage_model))
    if passage_path is not None and any((passage_path / name).is_file() for name in TOKENIZER_FILES):
        if load_tokenizer(str(passage_path)).get_vocab() != tokenizer.get_vocab():
            raise RagkitError(
                f"{passage_path}: its tokenizer's vocabulary differs from that of {path}, and one tokenizer serves "
                f"both towers (start the towers from models with the same vocabulary)"
            )
    return tokenizer


def tokenize_queries(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Queries -> ``input_ids`` / ``attention_mask`` ``(B, L)``, padded to the longest, truncated to ``max_length``."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def tokenize_passages(tokenizer: Any, titles: Sequence[str], texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Passages as ``[CLS] title [SEP] text [SEP]`` via the text-pair API -> ``(B, L)`` tensors.

    Truncation trims the longer of title and text first. Segment ids are dropped (all zero, as in DPR).
    """
    titles, texts = list(titles), list(texts)
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    encoded = tokenizer(titles, texts, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def sentence_transformers_pooling(directory: str | Path) -> tuple[str | None, bool | None]:
    """Pooling and normalisation named by a sentence-transformers directory, ``(None, None)`` if it is not one.

    Refuses module stacks this encoder would not reproduce (max pooling, a Dense head, ...).
    """
    directory = Path(directory)
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None, None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        pooling, normalize = None, False
        for module in modules:
            kind = str(module["type"]).rsplit(".", 1)[-1]
            if kind == "Pooling":
                config_file = directory / module["path"] / "config.json"
                pooling = _pooling_mode(json.loads(config_file.read_text(encoding="utf-8")), config_file)
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise RagkitError(
                    f"{modules_file}: module {kind} is not supported (ragkit encodes with transformer, pooling "
                    f"and normalisation only; pass pooling and normalize explicitly to use the transformer alone)"
                )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RagkitError(
            f"{modules_file}: unreadable sentence-transformers module list ({exc}); pass pooling and normalize explicitly"
        ) from None
    return pooling, normalize


def _pooling_mode(config: dict[str, Any], source: Path) -> str:
    # sentence-transformers >= 6 writes "pooling_mode"; earlier versions one boolean per mode.
    if "pooling_mode" in config:
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
    else:
        modes = [
            key[len("pooling_mode_"):].removesuffix("_token").removesuffix("_tokens")
            for key, on in config.items()
            if key.startswith("pooling_mode_") and on
        ]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise RagkitError(
            f"{source}: pooling {modes} is not supported (ragkit pools with one of: {', '.join(POOLINGS)}; pass pooling explicitly)"
        )
    return modes[0]


def write_sentence_transformers_modules(
    directory: str | Path, hidden_size: int, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """The module files that make ``SentenceTransformer(directory)`` pool and normalise as this encoder does.

    Written in the long-standing layout (the one all-MiniLM-L6-v2 ships with) that every
    sentence-transformers version from 2.x on reads.
    """
    directory = Path(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    write_json_atomic(directory / "modules.json", modules)
    write_json_atomic(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (directory / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
