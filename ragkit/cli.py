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
from typer.core import TyperGroup

from . import __version__
from .errors import RagkitError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="ragkit: corpus -> passages -> hard negatives -> dense retriever -> index -> answers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a model: `retriever` (a dual encoder on mined examples) or `reader` (RAG over an index).",
                         no_args_is_help=True)
app.add_typer(train_app, name="train")
export_app = typer.Typer(help="Write a trained model in another layout: `dpr` (DPRQuestionEncoder + DPRContextEncoder).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")

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
    format: Optional[str] = typer.Option(None, "--format", "-f", help="auto | dpr | beir | squad | jsonl | msmarco"),
    window: Optional[int] = typer.Option(None, help="Words per passage window (0: keep documents whole)."),
    stride: Optional[int] = typer.Option(None, help="Words between window starts (default: window, no overlap)."),
    dev_fraction: Optional[float] = typer.Option(None, help="Hold out this fraction of train as dev, grouped by document."),
    validation_fraction: Optional[float] = typer.Option(
        None, help="Then hold out this fraction of the rest of train as validation (for choosing settings), grouped by document."),
    seed: Optional[int] = typer.Option(None, help="Seed for the dev split."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="Drop duplicate passage ids instead of failing."),
    id_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage / question id."),
    title_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage title."),
    text_field: Optional[str] = typer.Option(None, help="jsonl: field holding the passage text."),
    question_field: Optional[str] = typer.Option(None, help="jsonl: field holding the question text."),
    answers_field: Optional[str] = typer.Option(None, help="jsonl: field holding the answer list."),
    positives_field: Optional[str] = typer.Option(None, help="jsonl: field holding gold passage ids."),
    qrels: Optional[list[str]] = typer.Option(
        None, "--qrels", help="TREC qrels (qid 0 pid grade) for the questions of a split: [split=]FILE (repeatable)."),
    strict: Optional[bool] = typer.Option(
        None, "--strict/--no-strict", help="SQuAD: refuse an answer not exactly at its answer_start (default: relocate it nearby)."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Read corpora and QA sets (DPR, BEIR, SQuAD, MS MARCO / TREC, jsonl) into passages + questions."""
    from .config import IngestConfig, load_config
    from .ingestion import run

    cfg = load_config(
        IngestConfig, config, "ingest", inputs=list(inputs), out=str(out) if out else None, format=format,
        window=window, stride=stride, dev_fraction=dev_fraction, validation_fraction=validation_fraction, seed=seed, dedup=dedup, id_field=id_field,
        title_field=title_field, text_field=text_field, question_field=question_field,
        answers_field=answers_field, positives_field=positives_field, qrels=qrels or None, strict=strict,
        overwrite=overwrite,
    )
    report(run(cfg))


@train_app.command("retriever")
@stage_command
def train_retriever(
    mine: Path = typer.Argument(..., help="The mine artifact (output directory of `ragkit mine`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    model: Optional[str] = typer.Option(None, help="Starting model: minilm, a Hugging Face directory, a DPR question encoder or a trained retriever."),
    passage_model: Optional[str] = typer.Option(None, help="Start a separate passage tower from this directory (a DPR context encoder)."),
    shared: Optional[bool] = typer.Option(None, "--shared/--separate", help="One encoder for both towers, or two (DPR)."),
    pooling: Optional[str] = typer.Option(None, help="cls | mean | dpr (default: the model's own)."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="L2-normalise embeddings (default: the model's own)."),
    similarity: Optional[str] = typer.Option(None, help="dot | cos"),
    temperature: Optional[float] = typer.Option(None, help="Softmax temperature of the contrastive loss."),
    loss: Optional[str] = typer.Option(None, help="dpr (query->passage) | gte (adds q->q, p->q, p->p)."),
    query_max_length: Optional[int] = typer.Option(None, help="Query tokens kept."),
    passage_max_length: Optional[int] = typer.Option(None, help="Passage tokens kept (title + text)."),
    batch_size: Optional[int] = typer.Option(None, help="Questions per step, over all processes."),
    hard_negatives: Optional[int] = typer.Option(None, help="Mined negatives per question (rotated across epochs)."),
    negative_offset: Optional[int] = typer.Option(None, help="Skip this many top-ranked mined negatives (likely unlabelled positives)."),
    mask_known_positives: Optional[bool] = typer.Option(
        None, "--mask-known-positives/--no-mask-known-positives",
        help="Keep passages labelled relevant to a question (positives, answer passages) out of its in-batch negatives."),
    chunk_size: Optional[int] = typer.Option(None, help="Gradient cache chunk in rows (0: plain step)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training examples."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (not on biases / LayerNorm)."),
    warmup: Optional[float] = typer.Option(None, help="Warm-up: fraction of steps if < 1, else steps."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm (0: off)."),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16 (CUDA only)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate on dev every N steps (0: at the end only)."),
    eval_max_passages: Optional[int] = typer.Option(None, help="Cap on passages searched at evaluation."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Rows per batch when encoding for evaluation."),
    select_metric: Optional[str] = typer.Option(None, help="Dev metric that picks the kept model (auto, accuracy@20, ndcg@10, ...)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save resumable state every N steps (0: never)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue an interrupted run from its last checkpoint."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling, negatives and dropout."),
    guide: Optional[str] = typer.Option(None, help="GISTEmbed guide model (frozen) that masks false negatives."),
    guide_margin_strategy: Optional[str] = typer.Option(None, help="none | absolute | relative"),
    guide_margin: Optional[float] = typer.Option(None, help="Margin of the guide's threshold."),
    negative_cache: Optional[int] = typer.Option(None, help="Cached passage embeddings used as extra negatives (0: off)."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Fine-tune a dual encoder on mined examples (contrastive, in-batch + hard negatives)."""
    from .config import TrainRetrieverConfig, load_config
    from .retriever.trainer import run

    cfg = load_config(
        TrainRetrieverConfig, config, "train-retriever", mine=str(mine), out=str(out) if out else None, model=model,
        passage_model=passage_model,
        shared=shared, pooling=pooling, normalize=normalize, similarity=similarity, temperature=temperature, loss=loss,
        query_max_length=query_max_length, passage_max_length=passage_max_length, batch_size=batch_size,
        hard_negatives=hard_negatives, negative_offset=negative_offset, mask_known_positives=mask_known_positives,
        chunk_size=chunk_size, epochs=epochs, max_steps=max_steps, lr=lr,
        weight_decay=weight_decay, warmup=warmup, max_grad_norm=max_grad_norm, precision=precision, device=device,
        eval_every=eval_every, eval_max_passages=eval_max_passages, eval_batch_size=eval_batch_size,
        select_metric=select_metric, checkpoint_every=checkpoint_every, resume=resume, seed=seed, guide=guide,
        guide_margin_strategy=guide_margin_strategy, guide_margin=guide_margin, negative_cache=negative_cache,
        overwrite=overwrite,
    )
    manifest = run(cfg)
    report(manifest)
    split = manifest.metrics.get("eval_split", "dev")
    if manifest.metrics.get(split):
        from .evaluation import format_table

        rows = {f"{split} (bm25)": manifest.metrics.get(f"bm25_{split}"),
                f"{split} (start)": manifest.metrics.get(f"{split}_start"),
                f"{split} (trained)": manifest.metrics[split]}
        typer.echo(format_table({name: row for name, row in rows.items() if row and "questions" in row}))


@train_app.command("reader")
@stage_command
def train_reader(
    index: Path = typer.Argument(..., help="The index artifact to retrieve from (output of `ragkit index`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    generator: Optional[str] = typer.Option(None, help="Generator: a BART-like or causal LM directory, or an alias (smollm2)."),
    query_model: Optional[str] = typer.Option(None, help="Query tower to start from (default: the index's encoder)."),
    marginal: Optional[str] = typer.Option(None, help="sequence (RAG-Sequence) | token (RAG-Token)."),
    n_docs: Optional[int] = typer.Option(None, help="Passages retrieved per question."),
    temperature: Optional[float] = typer.Option(None, help="Prior softmax(q.d / T); default: the retriever's training temperature."),
    retrieval: Optional[str] = typer.Option(None, help="dense | bm25 | hybrid: which passages are read."),
    bm25: Optional[str] = typer.Option(None, help="The `ragkit mine` artifact whose BM25 index serves bm25 / hybrid."),
    alpha: Optional[str] = typer.Option(None, help="Hybrid weight of BM25: a number or a `ragkit hybrid` artifact."),
    split: Optional[str] = typer.Option(None, help="Question split to train on."),
    eval_split: Optional[str] = typer.Option(None, help="Split answered to keep the best checkpoint (default: validation, else dev)."),
    eval_max_questions: Optional[int] = typer.Option(None, help="Evaluation questions (seeded sample; 0: all)."),
    eval_every: Optional[int] = typer.Option(None, help="Steps between evaluations (0: before and after training only)."),
    max_train_questions: Optional[int] = typer.Option(None, help="Train on a seeded sample of this many questions (0: all)."),
    batch_size: Optional[int] = typer.Option(None, help="Questions per step."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the training questions."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (0: run the epochs)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    warmup: Optional[float] = typer.Option(None, help="Warm-up: a fraction of the steps (< 1) or a number of steps."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing epsilon of the RAG loss."),
    freeze_query_encoder: Optional[bool] = typer.Option(None, "--freeze-query-encoder/--train-query-encoder", help="Train the generator only."),
    max_input_length: Optional[int] = typer.Option(None, help="Generator input tokens per (question, passage) pair."),
    decoding: Optional[str] = typer.Option(None, help="Evaluation decoding: greedy | beam | thorough | fast (default: the marginal's own)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute generator activations in backward: less memory, more time."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (0: none)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order and samples."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Train a RAG reader (generator + query tower) over a fixed index: RAG-Sequence or RAG-Token."""
    from .config import load_config
    from .reader.config import TrainReaderConfig
    from .reader.train import run

    cfg = load_config(
        TrainReaderConfig, config, "train-reader", index=str(index), out=str(out) if out else None, generator=generator,
        query_model=query_model, marginal=marginal, n_docs=n_docs, temperature=temperature, retrieval=retrieval, bm25=bm25, alpha=alpha, split=split,
        eval_split=eval_split, eval_max_questions=eval_max_questions, eval_every=eval_every,
        max_train_questions=max_train_questions, batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr,
        warmup=warmup, label_smoothing=label_smoothing, freeze_query_encoder=freeze_query_encoder,
        max_input_length=max_input_length, decoding=decoding, gradient_checkpointing=gradient_checkpointing,
        precision=precision, device=device,
        checkpoint_every=checkpoint_every, resume=resume, seed=seed, overwrite=overwrite,
    )
    manifest = run(cfg)
    report(manifest)
    split_name = manifest.metrics.get("eval_split")
    if split_name:
        from .reader.answer import format_progress

        typer.echo(format_progress(split_name, manifest.metrics))


@app.command()
@stage_command
def answer(
    reader: str = typer.Argument(..., help="A `ragkit train reader` artifact, or a generator directory / alias (smollm2)."),
    question: Optional[str] = typer.Argument(None, help="One question to answer (or pass --split / --questions)."),
    index: Optional[str] = typer.Option(None, help="The index artifact to retrieve from."),
    version: Optional[str] = typer.Option(None, help="Index version (default: current)."),
    split: Optional[str] = typer.Option(None, help="Answer a question split of the index's ingest artifact."),
    questions: Optional[str] = typer.Option(None, help="Answer a jsonl file of {question, id?, answers?}."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory (with --split / --questions)."),
    n_docs: Optional[int] = typer.Option(None, help="Passages per question; 0: closed-book."),
    decoding: Optional[str] = typer.Option(None, help="greedy | beam (RAG-Token) | thorough | fast (RAG-Sequence)."),
    num_beams: Optional[int] = typer.Option(None, help="Beams per search."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest answer, in tokens."),
    retrieval: Optional[str] = typer.Option(None, help="dense | bm25 | hybrid."),
    bm25: Optional[str] = typer.Option(None, help="The `ragkit mine` artifact whose BM25 index serves bm25 / hybrid."),
    alpha: Optional[str] = typer.Option(None, help="Hybrid weight of BM25: a number or a `ragkit hybrid` artifact."),
    max_questions: Optional[int] = typer.Option(None, help="Answer a seeded sample of this many questions (0: all)."),
    batch_size: Optional[int] = typer.Option(None, help="Questions per batch."),
    max_input_length: Optional[int] = typer.Option(None, help="Generator input tokens per (question, passage) pair."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    seed: Optional[int] = typer.Option(None, help="Seed of the question sample."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Answer questions from retrieved passages: one question printed, or a split / file -> predictions + EM/F1."""
    from .config import load_config
    from .reader.answer import answer_one, format_prediction, format_metrics, run
    from .reader.config import AnswerConfig

    cfg = load_config(
        AnswerConfig, config, "answer", reader=reader, question=question, index=index, version=version, split=split,
        questions=questions, out=str(out) if out else None, n_docs=n_docs, decoding=decoding, num_beams=num_beams,
        max_new_tokens=max_new_tokens, retrieval=retrieval, bm25=bm25, alpha=alpha, max_questions=max_questions,
        batch_size=batch_size, max_input_length=max_input_length, precision=precision, device=device, seed=seed,
        overwrite=overwrite,
    )
    if cfg.question is not None:
        typer.echo(format_prediction(answer_one(cfg)))
        return
    manifest = run(cfg)
    report(manifest)
    typer.echo(format_metrics(manifest.metrics))


@app.command()
@stage_command
def sweep(
    spec: Path = typer.Argument(..., help="Sweep file (TOML): mine, out, seeds, select, [train], [grid], [[runs]]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the file's `out`)."),
    shard: Optional[str] = typer.Option(None, help="I/N: train only runs I, I+N, I+2N, ... of the plan (one process per shard)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing; write the tables from the finished runs."),
) -> None:
    """Train a retriever under several settings and seeds (resumable); name the best on validation."""
    from .sweep import load_spec, parse_shard, run

    cfg = load_spec(spec, str(out) if out else None)
    best = run(cfg, shard=parse_shard(shard), train=not report_only)
    typer.echo((Path(cfg.out) / "sweep.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {cfg.out}/sweep.md, sweep.csv, sweep.png; winner on validation: {best['name']}")


@export_app.command("dpr")
@stage_command
def export_dpr(
    retriever: Path = typer.Argument(..., help="A trained retriever (output directory of `ragkit train retriever`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory: question_encoder/ + ctx_encoder/."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Export a cls-pooled, unnormalised retriever as DPRQuestionEncoder + DPRContextEncoder directories."""
    from .config import ExportDprConfig, load_config
    from .retriever.dpr import run

    cfg = load_config(ExportDprConfig, config, "export-dpr", retriever=str(retriever), out=str(out) if out else None,
                      overwrite=overwrite)
    report(run(cfg))


@app.command()
@stage_command
def mine(
    ingest: Path = typer.Argument(..., help="The ingest artifact (output directory of `ragkit ingest`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Question split to mine (repeatable; default: all)."),
    depth: Optional[int] = typer.Option(None, help="BM25 results per question."),
    negatives: Optional[int] = typer.Option(None, help="Hard negatives kept per question."),
    random_negatives: Optional[int] = typer.Option(None, help="Random negatives per question."),
    given_negatives: Optional[str] = typer.Option(
        None, help="Negatives that came with the questions (DPR JSON): ignore | first (then mined) | only."),
    seed: Optional[int] = typer.Option(None, help="Seed for the random negatives."),
    backend: Optional[str] = typer.Option(None, help="bm25s | rank-bm25"),
    method: Optional[str] = typer.Option(None, help="robertson | lucene"),
    k1: Optional[float] = typer.Option(None, help="BM25 term-frequency saturation."),
    b: Optional[float] = typer.Option(None, help="BM25 length normalisation."),
    stopwords: Optional[bool] = typer.Option(None, "--stopwords/--no-stopwords", help="Drop English stop words."),
    stem: Optional[bool] = typer.Option(None, "--stem/--no-stem", help="Snowball stemming (needs PyStemmer)."),
    match_type: Optional[str] = typer.Option(None, help="string (DPR token match) | regex"),
    export_dpr: Optional[bool] = typer.Option(None, "--export-dpr/--no-export-dpr", help="Also write dpr/<split>.json."),
    chunk_size: Optional[int] = typer.Option(None, help="Questions per retrieval chunk."),
    workers: Optional[int] = typer.Option(None, help="Processes / threads (0: one per core)."),
    index_from: Optional[Path] = typer.Option(None, help="Reuse the BM25 index of this mine artifact."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """BM25-retrieve every question; write runs, positives and hard negatives."""
    from .config import MineConfig, load_config
    from .evaluation import format_table
    from .mining import run

    cfg = load_config(
        MineConfig, config, "mine", ingest=str(ingest), out=str(out) if out else None, splits=split or None,
        depth=depth, negatives=negatives, random_negatives=random_negatives, given_negatives=given_negatives, seed=seed, backend=backend,
        method=method, k1=k1, b=b, stopwords=stopwords, stem=stem, match_type=match_type, export_dpr=export_dpr,
        chunk_size=chunk_size, workers=workers, index_from=str(index_from) if index_from else None,
        overwrite=overwrite,
    )
    manifest = run(cfg)
    report(manifest)
    typer.echo(format_table(manifest.metrics))


@app.command()
@stage_command
def evaluate(
    runs: list[str] = typer.Argument(..., help="Artifacts holding runs/ (mine, index, hybrid), or NAME=path (artifact or .trec file)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for metrics.json, per_question/, topk.png."),
    ingest: Optional[Path] = typer.Option(None, help="Ingest artifact with the questions (default: the artifacts' own)."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split to score (repeatable; default: every split all runs have)."),
    k: Optional[list[int]] = typer.Option(None, "--k", help="Cut-off for top-k accuracy and recall (repeatable)."),
    match_type: Optional[str] = typer.Option(None, help="string (DPR token match) | regex"),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Score runs side by side: top-k accuracy, recall, MRR@10, nDCG@10; per-question results and a top-k plot."""
    from .config import EvaluateConfig, load_config
    from .evaluation import format_comparison, format_table, run

    cfg = load_config(
        EvaluateConfig, config, "evaluate", runs=list(runs), out=str(out) if out else None,
        ingest=str(ingest) if ingest else None, splits=split or None, ks=k or None, match_type=match_type,
        overwrite=overwrite,
    )
    manifest = run(cfg)
    typer.echo(format_table(manifest.metrics) if len(cfg.runs) == 1 else format_comparison(manifest.metrics))
    typer.echo(f"wrote {manifest.path / 'metrics.json'}, {manifest.files['plot']} and per_question/")


@app.command()
@stage_command
def hybrid(
    dense: Path = typer.Argument(..., help="Artifact with the dense runs (output of `ragkit index`; any artifact holding runs)."),
    bm25: Path = typer.Argument(..., help="Artifact with the BM25 runs (output of `ragkit mine`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    method: Optional[str] = typer.Option(None, help="linear (dense + alpha * bm25) | rrf (reciprocal rank fusion)."),
    alpha: Optional[str] = typer.Option(None, help="linear: the BM25 weight, or 'tuned' (default) to pick it on --tune-split."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="linear: min-max centre each run's scores first."),
    rrf_k: Optional[float] = typer.Option(None, help="rrf: the k of 1 / (k + rank)."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split to fuse (repeatable; default: all but the tune split)."),
    depth: Optional[int] = typer.Option(None, help="Results kept from each run and in the fused run."),
    tune_split: Optional[str] = typer.Option(None, help="Split alpha is tuned on, never reported (default: validation, else train)."),
    tune_metric: Optional[str] = typer.Option(None, help="Metric alpha maximises (auto, accuracy@20, ndcg@10, ...)."),
    tune_max_questions: Optional[int] = typer.Option(None, help="Tune on a seeded sample of at most this many questions."),
    seed: Optional[int] = typer.Option(None, help="Seed of the tuning sample."),
    match_type: Optional[str] = typer.Option(None, help="string (DPR token match) | regex, for top-k accuracy when tuning."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Fuse dense and BM25 runs (linear with a tuned alpha, or RRF) into hybrid runs."""
    from .config import HybridConfig, load_config
    from .indexing.hybrid import run

    cfg = load_config(
        HybridConfig, config, "hybrid", dense=str(dense), bm25=str(bm25), out=str(out) if out else None, method=method,
        alpha=alpha, normalize=normalize, rrf_k=rrf_k, splits=split or None, depth=depth, tune_split=tune_split,
        tune_metric=tune_metric, tune_max_questions=tune_max_questions, seed=seed, match_type=match_type,
        overwrite=overwrite,
    )
    manifest = run(cfg)
    typer.echo(f"wrote {manifest.path} (hybrid: {', '.join(f'{s}={n}' for s, n in manifest.counts['questions'].items())} questions)")
    tuning = manifest.metrics.get("tuning")
    if tuning:
        typer.echo(f"alpha = {tuning['alpha']:g}, tuned on {tuning['split']} ({tuning['questions']} of {tuning['of_questions']} "
                   f"questions): {tuning['metric']} = {tuning['value']:.4f}")
    elif manifest.metrics.get("alpha") is not None:
        typer.echo(f"alpha = {manifest.metrics['alpha']:g} (given)")



class _BuildByDefault(TyperGroup):
    """``ragkit index ARGS`` runs ``ragkit index build ARGS`` unless ARGS start with a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


index_app = typer.Typer(cls=_BuildByDefault, no_args_is_help=True,
                        help="Dense index: `build` (the default), `update` by passage id, `rollback` to an earlier version.")
app.add_typer(index_app, name="index")


@index_app.command("build")
@stage_command
def index_build(
    ingest: Path = typer.Argument(..., help="The ingest artifact (or a mine artifact: its ingest)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output artifact directory."),
    model: Optional[str] = typer.Option(None, help="Encoder: a trained retriever, a Hugging Face directory, or minilm."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Question split to search (repeatable; default: dev)."),
    depth: Optional[int] = typer.Option(None, help="Passages per question in the runs."),
    factory: Optional[str] = typer.Option(None, help="FAISS index_factory string: Flat, HNSW32, IVF4096,Flat, IVF4096,PQ64, ..."),
    train_sample: Optional[int] = typer.Option(None, help="Vectors sampled to train IVF / PQ."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists visited per query."),
    ef_search: Optional[int] = typer.Option(None, help="HNSW beam width (raised to --depth when smaller)."),
    similarity: Optional[str] = typer.Option(None, help="dot | cos (default: the retriever's)."),
    query_max_length: Optional[int] = typer.Option(None, help="Query tokens kept (default: the retriever's, else 32)."),
    passage_max_length: Optional[int] = typer.Option(None, help="Passage tokens kept (default: the retriever's, else 128)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per encoding batch."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA)."),
    dtype: Optional[str] = typer.Option(None, help="Stored embeddings: float32 | float16."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    shard: Optional[str] = typer.Option(None, help="i/N: encode shard i of N and stop (merge with a run without --shard)."),
    shards: Optional[int] = typer.Option(None, help="Shards of a new encoding (0: about one per million passages)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the IVF / PQ training sample."),
    config: Optional[Path] = ConfigOpt,
    overwrite: Optional[bool] = OverwriteOpt,
) -> None:
    """Encode the passages, build a FAISS index and write dense runs for question splits."""
    from .config import IndexConfig, load_config
    from .indexing.stage import run

    cfg = load_config(
        IndexConfig, config, "index", ingest=str(ingest), out=str(out) if out else None, model=model,
        splits=split or None, depth=depth, factory=factory, train_sample=train_sample, nprobe=nprobe,
        ef_search=ef_search, similarity=similarity, query_max_length=query_max_length,
        passage_max_length=passage_max_length, batch_size=batch_size, precision=precision, dtype=dtype, device=device,
        shard=shard, shards=shards, seed=seed, overwrite=overwrite,
    )
    manifest = run(cfg)
    if manifest is None:
        typer.echo("encoded; run again without --shard to merge the shards" if cfg.shard else "encoded this process's shards")
    else:
        report(manifest)


@index_app.command("update")
@stage_command
def index_update(
    index: Path = typer.Argument(..., help="The index artifact (output directory of `ragkit index`)."),
    add: Optional[Path] = typer.Option(None, help="jsonl of new passages {id, title, text}."),
    replace: Optional[Path] = typer.Option(None, help="jsonl of changed passages {id, title, text}."),
    delete: Optional[Path] = typer.Option(None, help="Passage ids to delete, one a line."),
    model: Optional[str] = typer.Option(None, help="The encoder (default: the one that built the index)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per encoding batch."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Add, replace and delete passages by id as a new version, then make it current."""
    from .config import IndexUpdateConfig, load_config
    from .indexing.versions import update

    cfg = load_config(
        IndexUpdateConfig, config, "index-update", index=str(index), add=add, replace=replace, delete=delete,
        model=model, batch_size=batch_size, precision=precision, device=device,
    )
    version = update(cfg)
    counts = ", ".join(f"{k}={v}" for k, v in version.info["counts"].items())
    typer.echo(f"{index}: current version {version.name} ({counts})")


@index_app.command("rollback")
@stage_command
def index_rollback(
    index: Path = typer.Argument(..., help="The index artifact (output directory of `ragkit index`)."),
    to: Optional[str] = typer.Option(None, help="Version to make current, e.g. v0001 (default: the current one's parent)."),
) -> None:
    """Make an earlier version current again."""
    from .indexing.versions import rollback

    version = rollback(index, to)
    typer.echo(f"{index}: current version {version.name}")


@app.command()
@stage_command
def serve(
    index: Path = typer.Argument(..., help="The index artifact (output directory of `ragkit index`); its current version is served."),
    mine: Optional[Path] = typer.Option(None, help="The mine artifact of the index's ingest: enables bm25 and hybrid retrieval."),
    alpha: Optional[str] = typer.Option(None, help="Hybrid weight of BM25: a number or a `ragkit hybrid` artifact (enables hybrid)."),
    reader: Optional[str] = typer.Option(None, help="A trained reader or a generator (directory or alias): enables /answer."),
    host: Optional[str] = typer.Option(None, help="Address to listen on (default 127.0.0.1: this machine only)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default 8000)."),
    max_batch: Optional[int] = typer.Option(None, help="Requests answered together in one call."),
    batch_window_ms: Optional[float] = typer.Option(None, help="How long a batch waits for more requests to join."),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="Micro-batch requests, or answer one at a time."),
    poll_seconds: Optional[float] = typer.Option(None, help="Check the index's current version every N seconds (0: only on POST /admin/reload)."),
    max_body_bytes: Optional[int] = typer.Option(None, help="Largest request body accepted (413 above)."),
    max_pending: Optional[int] = typer.Option(None, help="Requests queued at once (503 above)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Serve retrieval (and answers) over HTTP, following the index's current version."""
    from .config import ServeConfig, load_config
    from .serving.app import run

    cfg = load_config(
        ServeConfig, config, "serve", index=str(index), mine=str(mine) if mine else None, alpha=alpha, reader=reader,
        host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms, batching=batching,
        poll_seconds=poll_seconds, max_body_bytes=max_body_bytes, max_pending=max_pending, device=device,
        precision=precision,
    )
    run(cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
