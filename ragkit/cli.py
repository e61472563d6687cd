"""The ``ragkit`` command line: one command per stage, parsing flags and calling the stage's ``run``.

No logic lives here. Each command builds the stage's config from defaults < ``--config`` TOML < flags
(flags default to ``None`` so only the ones given override), calls ``run(config)``, and prints where the
artifact went. A :class:`~ragkit.errors.RagkitError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from . import __version__
from .errors import RagkitError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="ragkit: corpus -> passages -> hard negatives -> dense retriever -> index -> answers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a model: `retriever` (dual encoder) or `reader`.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML file with this stage's settings; flags override it.")
OverwriteOpt = typer.Option(None, "--overwrite/--no-overwrite", help="Replace an existing output directory.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ragkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ragkit: each stage reads the artifact of the previous one and writes its own."""


def stage_command(func: Callable) -> Callable:
    """Turn RagkitError into one line on stderr and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RagkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; no artifact was written", err=True)
            raise typer.Exit(130) from None

    return wrapper


def report(manifest) -> None:
    """Print the artifact's location and counts after a stage finishes."""
    counts = ", ".join(f"{k}={v}" for k, v in manifest.counts.items() if not isinstance(v, dict))
    typer.echo(f"wrote {manifest.path} ({manifest.stage}: {counts})")


@app.command()
@stage_command
def ingest(
    inputs: list[str] = typer.Argument(..., help="Files or directories; `split=path` names a question file's split."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="auto | dpr | beir | squad | jsonl"),
    window: Optional[int] = typer.Option(None, help="Words per passage window (0: keep documents whole)."),
    stride: Optional[int] = typer.Option(None, help="Words between window starts (default: window)."),
    dev_fraction: Optional[float] = typer.Option(None, help="Hold out this fraction of train as dev, grouped by document."),
    seed: Optional[int] = typer.Option(None, help="Seed for the dev split."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="Drop duplicate passage ids instead of failing."),
    id_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage / question id."),
    title_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage title."),
    text_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage text."),
    question_field: Optional[str] = typer.Option(None, help="jsonl: field holding the question text."),
    answers_field: Optional[str] = typer.Option(None, help="jsonl: field holding the answer list."),
    positives_field: Optional[str] = typer.Option(None, help="jsonl: field holding gold passage ids."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Read corpora and QA sets (DPR, BEIR, SQuAD, jsonl) into passages + questions."""
    from .config import IngestConfig, load_config
    from .corpus import run

    if window is not None and stride is None:
        stride = window or None
    cfg = load_config(
        IngestConfig, config, "ingest", inputs=list(inputs), out=str(out) if out else None, format=format,
        window=window, stride=stride, dev_fraction=dev_fraction, seed=seed, dedup=dedup, id_field=id_field,
        title_field=title_field, text_field=text_field, question_field=question_field,
        answers_field=answers_field, positives_field=positives_field, overwrite=overwrite,
    )
    report(run(cfg))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
