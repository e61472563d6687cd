"""Encoding passages and queries with a :class:`~ragkit.retriever.encoder.BiEncoder`: the one encoding path.

Every vector ragkit searches is made here: the index stage, index updates, the dense searcher and the
training loop's dev evaluation all call :func:`encode_passages` and :func:`encode_queries`.

- Passages are tokenised as ``[CLS] title [SEP] text [SEP]`` by
  :func:`~ragkit.retriever.encoder.tokenize_passages`, queries by
  :func:`~ragkit.retriever.encoder.tokenize_queries`, exactly as in training.
- Rows are read in blocks; inside a block they are sorted by length so each batch pads to similar lengths
  (less wasted compute), and each vector is written back to its original row.
- Under ``torch.inference_mode`` with bf16 autocast where the hardware has it (``precision="auto"``: CUDA
  with bf16 support, or a CPU with AMX / AVX-512 BF16); ``fp32``, ``bf16`` and ``fp16`` (CUDA) force it.
  Vectors leave the model as float32 either way.
- Passage embeddings stream into a memory-mapped ``embeddings.npy`` (float32 or float16) with the passage
  ids beside it (``ids.txt``, one per line, same order), so memory stays flat with the corpus size.

Large corpora are encoded a shard at a time (``encode_passages(..., start=, stop=)``) into the shard
directories :mod:`ragkit.indexing.shards` keeps. :func:`resolve_device` and :func:`resolve_precision` also
pick the training loop's device and autocast dtype, so training and indexing agree on both.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import RagkitError
from ..retriever.encoder import BiEncoder, autocast, tokenize_passages, tokenize_queries

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float32", "float16")
BLOCK_ROWS = 8192
"""Rows read and length-sorted together; each block's vectors are written before the next is read."""
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- device and precision ----------------------------------------------------------------------------


def resolve_device(requested: str = "auto", dist_info: Any = None) -> torch.device:
    """The device to run on: torchrun's per-process device when there are several processes
    (``dist_info``, a :class:`~ragkit.retriever.distributed.DistInfo`), else ``cuda`` when available for
    ``auto``; an explicit CUDA device must exist."""
    if dist_info is not None and dist_info.world_size > 1:
        return dist_info.device
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RagkitError(f"device={requested!r} but no CUDA device is available (use --device cpu or auto)")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX-512 BF16), so bf16 autocast pays off."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32).

    ``auto`` picks bf16 on CUDA devices that support it and on CPUs with native bf16, else float32.
    """
    if precision not in PRECISIONS:
        raise RagkitError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if precision == "fp16" and device.type != "cuda":
        raise RagkitError(f"precision=fp16 needs a CUDA device, this run is on {device.type} (use --precision bf16 or fp32)")
    return _AUTOCAST_DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """The name of an autocast dtype as :func:`resolve_precision` takes it (None -> fp32)."""
    return next(name for name, value in _AUTOCAST_DTYPES.items() if value == dtype)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while encoding; the model's previous mode is restored afterwards (training calls this)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward(model: BiEncoder, inputs: dict[str, Tensor], tower: str, device: torch.device,
             autocast_dtype: torch.dtype | None) -> np.ndarray:
    inputs = {name: value.to(device) for name, value in inputs.items()}
    with autocast(device, autocast_dtype):
        vectors = model(**inputs, tower=tower)  # (b, D)
    return vectors.float().cpu().numpy()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- passage sources ---------------------------------------------------------------------------------


class PassageSource(Protocol):
    """Rows of passages: :func:`encode_passages` reads ``block(start, stop)`` -> (ids, titles, texts)."""

    def __len__(self) -> int: ...

    def block(self, start: int, stop: int) -> tuple[list[str], list[str], list[str]]: ...


@dataclasses.dataclass
class PassageTexts:
    """Passages held in memory (an update file, a dev subset)."""

    ids: Sequence[str]
    titles: Sequence[str]
    texts: Sequence[str]

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.titles) == len(self.texts):
            raise ValueError(f"{len(self.ids)} ids, {len(self.titles)} titles and {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.ids)

    def block(self, start: int, stop: int) -> tuple[list[str], list[str], list[str]]:
        return list(self.ids[start:stop]), list(self.titles[start:stop]), list(self.texts[start:stop])


class LookupPassages:
    """The passages of an ingest artifact (a :class:`~ragkit.evaluation.PassageLookup`), read by Arrow."""

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __len__(self) -> int:
        return len(self.lookup)

    def block(self, start: int, stop: int) -> tuple[list[str], list[str], list[str]]:
        rows = np.arange(start, stop, dtype=np.int64)
        return self.lookup.ids_at(rows), self.lookup.titles_at(rows), self.lookup.texts_at(rows)


# --- encoding ----------------------------------------------------------------------------------------


def _length_order(titles: Sequence[str], texts: Sequence[str]) -> list[int]:
    """Row positions, longest first: batches then pad to similar lengths, and the longest batch runs first
    (an out-of-memory error shows at once, not hours in)."""
    return sorted(range(len(texts)), key=lambda i: len(titles[i]) + len(texts[i]), reverse=True)


@torch.inference_mode()
def encode_queries(
    model: BiEncoder,
    tokenizer: Any,
    queries: Sequence[str],
    max_length: int,
    *,
    batch_size: int = 128,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Query vectors ``(Q, D)`` float32, in the order given, from the query tower on the model's device."""
    queries = list(queries)
    device = _model_device(model)
    vectors = np.empty((len(queries), model.embedding_dim), dtype=np.float32)  # (Q, D)
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]), reverse=True)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = tokenize_queries(tokenizer, [queries[i] for i in rows], max_length)
            vectors[rows] = _forward(model, inputs, "query", device, autocast_dtype)
    return vectors


@torch.inference_mode()
def encode_passages(
    model: BiEncoder,
    tokenizer: Any,
    passages: PassageSource,
    out_dir: str | Path,
    max_length: int,
    *,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 128,
    autocast_dtype: torch.dtype | None = None,
    dtype: str = "float32",
    progress: Any = None,
) -> Path:
    """Encode rows ``[start, stop)`` of ``passages`` into ``out_dir``: ``embeddings.npy`` ``(n, D)`` and
    ``ids.txt``, both in row order. Returns ``out_dir``.

    The matrix is a memory-mapped ``.npy`` (``numpy.lib.format.open_memmap``) written block by block, so
    memory stays bounded whatever the number of rows. ``progress`` (a tqdm bar) is advanced per block.
    """
    if dtype not in DTYPES:
        raise RagkitError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    stop = len(passages) if stop is None else stop
    if not 0 <= start <= stop <= len(passages):
        raise ValueError(f"rows [{start}, {stop}) are outside the {len(passages)} passages")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _model_device(model)
    matrix = np.lib.format.open_memmap(out_dir / EMBEDDINGS_FILE, mode="w+", dtype=np.dtype(dtype),
                                       shape=(stop - start, model.embedding_dim))  # (n, D)
    with open(out_dir / IDS_FILE, "w", encoding="utf-8") as ids_file, _eval_mode(model):
        for block_start in range(start, stop, BLOCK_ROWS):
            ids, titles, texts = passages.block(block_start, min(stop, block_start + BLOCK_ROWS))
            bad = next((pid for pid in ids if not pid or "\n" in pid or "\r" in pid), None)
            if bad is not None:
                raise RagkitError(f"passage id {bad!r} is empty or holds a line break (fix the corpus ids and ingest again)")
            order = _length_order(titles, texts)
            offset = block_start - start
            for batch_start in range(0, len(order), batch_size):
                rows = order[batch_start : batch_start + batch_size]
                inputs = tokenize_passages(tokenizer, [titles[i] for i in rows], [texts[i] for i in rows], max_length)
                matrix[offset + np.asarray(rows)] = _forward(model, inputs, "passage", device, autocast_dtype)
            ids_file.write("".join(f"{pid}\n" for pid in ids))
            if progress is not None:
                progress.update(len(ids))
    matrix.flush()
    del matrix
    return out_dir


def read_ids(directory: str | Path) -> list[str]:
    """The passage ids written beside an ``embeddings.npy`` (row order)."""
    with open(Path(directory) / IDS_FILE, encoding="utf-8") as handle:
        return handle.read().splitlines()


def open_embeddings(directory: str | Path) -> np.ndarray:
    """The ``embeddings.npy`` of ``directory``, memory-mapped read-only ``(n, D)``."""
    return np.load(Path(directory) / EMBEDDINGS_FILE, mmap_mode="r")
