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


def load_config(cls: type[C], toml_path: str | Path | None = None, section: str | None = None, **overrides: Any) -> C:
    """Build ``cls`` from defaults < TOML file < keyword overrides (``None`` overrides are ignored)."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if toml_path is not None:
        toml_path = Path(toml_path)
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RagkitError(f"{toml_path}: config file not found (check the --config path)") from None
        except tomllib.TOMLDecodeError as exc:
            raise RagkitError(f"{toml_path}: invalid TOML ({exc}); fix the syntax") from None
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


INGEST_FORMATS = ("auto", "dpr", "beir", "squad", "jsonl")


@dataclasses.dataclass
class IngestConfig:
    """``ragkit ingest``: raw corpora and QA sets -> passages + questions."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    """Files or directories to read. A ``split=path`` form names the split of a question file."""
    out: str = "artifacts/ingest"
    format: str = "auto"
    window: int = 100
    """Words per passage window; 0 keeps each document whole."""
    stride: int = 100
    """Words between window starts (== window: no overlap)."""
    dev_fraction: float = 0.0
    """Hold out this fraction of train questions as 'dev', grouped by document."""
    seed: int = 0
    dedup: bool = False
    """Drop repeated passage ids (keeping the first) instead of failing."""
    id_field: str = "id"
    title_field: str = "title"
    text_field: str = "text"
    question_field: str = "question"
    answers_field: str = "answers"
    positives_field: str = "positive_ids"
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_choice("format", self.format, INGEST_FORMATS)
        _check_positive("window", self.window, allow_zero=True)
        if self.window and not 0 < self.stride <= self.window:
            raise RagkitError(f"stride={self.stride} must be in 1..window ({self.window})")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise RagkitError(f"dev_fraction={self.dev_fraction} must be in [0, 1)")
        self.inputs = [str(p) for p in self.inputs]
