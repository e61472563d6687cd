"""Several runs evaluated side by side: which runs to read, per-question files, the top-k plot, the table.

``ragkit evaluate A B C`` scores each run against the same ingest questions (the metrics themselves are
:mod:`ragkit.evaluation`'s). A run is an artifact directory holding ``runs/<split>.trec`` (stages mine,
index, hybrid), named after its directory, or ``name=path`` with path an artifact directory or a single
TREC file. A TREC file covers the split its stem names (``dev.trec``), or the one split given with
``--split``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .artifacts import Manifest, artifact_input, file_input, read_upstream
from .errors import RagkitError
from .evaluation import find_ingest

CURVE_K = 100
"""The top-k plot runs k = 1 .. CURVE_K."""
_NAME = re.compile(r"[\w.+-]+")


@dataclasses.dataclass
class RunSource:
    """One run to score: its name (a column of the table) and its TREC file per split."""

    name: str
    path: Path
    runs: dict[str, Path]
    manifest: Manifest | None = None
    """The artifact's manifest; None for a bare TREC file."""

    def input(self) -> dict[str, Any]:
        """Its record in the evaluate manifest's ``inputs``."""
        if self.manifest is not None:
            record = artifact_input(self.path, self.manifest)
        else:
            record = file_input(self.path, "run")
        record["run"] = self.name
        return record


def _parse_spec(spec: str) -> tuple[str | None, Path]:
    """``name=path`` or a bare path (a name holds no path separator, so ``a/b=c`` stays a path)."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        return name, Path(rest)
    return None, Path(spec)


def _open_source(spec: str) -> RunSource:
    name, path = _parse_spec(spec)
    if path.is_file():
        return RunSource(name or path.stem, path, {})
    manifest = Manifest.load(path)
    runs_dir = path / "runs"
    if not runs_dir.is_dir():
        raise RagkitError(
            f"{path}: is a stage '{manifest.stage}' artifact with no runs/ folder, evaluate needs one that holds runs "
            f"(pass the output directory of `ragkit mine`, `ragkit index` or `ragkit hybrid`, or a run file)"
        )
    manifest = read_upstream(path, manifest.stage)
    runs = {p.stem: p for p in sorted(runs_dir.glob("*.trec"))}
    return RunSource(name or path.resolve().name, path, runs, manifest)


def resolve_runs(specs: Sequence[str], ingest: str | None, splits: Sequence[str]) -> tuple[list[RunSource], Path, list[str]]:
    """The runs to score, the ingest artifact holding their questions, and the splits every run covers."""
    sources = [_open_source(spec) for spec in specs]
    seen: set[str] = set()
    for source in sources:
        if not _NAME.fullmatch(source.name):
            raise RagkitError(f"{source.path}: run name {source.name!r} may hold only letters, digits and . _ + - (name it: NAME={source.path})")
        if source.name in seen:
            raise RagkitError(f"{source.path}: two runs are named {source.name!r} (name them apart: NAME=path)")
        seen.add(source.name)

    if ingest:
        ingest_dir = Path(ingest)
    else:
        found = {find_ingest(s.manifest).resolve(): s for s in sources if s.manifest is not None}
        if not found:
            raise RagkitError(f"{sources[0].path}: a run file records no ingest artifact (pass --ingest with the one its questions come from)")
        if len(found) > 1:
            (a, first), (b, second) = list(found.items())[:2]
            raise RagkitError(f"{second.path}: was made from ingest artifact {b}, {first.path} from {a}; compare runs of one ingest artifact (or pass --ingest)")
        ingest_dir = next(iter(found))

    question_root = ingest_dir / "questions"
    known = {p.name for p in question_root.iterdir() if p.is_dir()} if question_root.is_dir() else set()
    for source in sources:
        if source.manifest is None:
            split = source.path.stem if source.path.stem in known else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise RagkitError(f"{source.path}: cannot tell which split this run file covers (name it after the split, e.g. dev.trec, or pass one --split)")
            source.runs = {split: source.path}

    if splits:
        for split in splits:
            for source in sources:
                if split not in source.runs:
                    raise RagkitError(f"{source.path}: has no run for split '{split}' (runs: {', '.join(source.runs) or 'none'})")
        return sources, ingest_dir, list(splits)
    common = sorted(set.intersection(*(set(s.runs) for s in sources)))
    if not common:
        listed = "; ".join(f"{s.name}: {', '.join(s.runs) or 'none'}" for s in sources)
        raise RagkitError(f"{sources[0].path}: the runs share no split ({listed}); produce runs for one split with each")
    return sources, ingest_dir, common


# --- per question and the top-k curves ---------------------------------------------------------------


class TopKCurves:
    """Top-k accuracy, gold-passage recall and judged-document recall at k = 1..CURVE_K, over questions.

    Fed the per-question records of :func:`ragkit.evaluation.question_record`; at a cut-off the
    evaluation also reports, each curve equals that metric (``accuracy@k``, ``recall@k``; documents at 100).
    """

    KINDS = (("answer", "top-k accuracy"), ("gold", "passage recall@k"), ("doc", "document recall@k"))

    def __init__(self, max_k: int = CURVE_K) -> None:
        self.max_k = max_k
        self.sums = {kind: np.zeros(max_k, dtype=np.float64) for kind, _ in self.KINDS}  # (K,) gains first at rank k
        self.counts = {kind: 0 for kind, _ in self.KINDS}

    def _gain(self, kind: str, ranks: Sequence[int], weight: float) -> None:
        self.counts[kind] += 1
        for rank in ranks:
            if rank <= self.max_k:
                self.sums[kind][rank - 1] += weight

    def add(self, record: Mapping[str, Any]) -> None:
        if "answer_rank" in record:
            self._gain("answer", [record["answer_rank"]] if record["answer_rank"] else [], 1.0)
        if "gold_ranks" in record:
            self._gain("gold", record["gold_ranks"], 1.0 / record["gold_passages"])
        if "relevant_doc_ranks" in record:
            self._gain("doc", record["relevant_doc_ranks"], 1.0 / record["relevant_docs"])

    def curve(self) -> tuple[str, np.ndarray] | None:
        """(label, (K,) values) of the first kind any question has: accuracy, else passage, else document recall."""
        for kind, label in self.KINDS:
            if self.counts[kind]:
                return label, np.cumsum(self.sums[kind]) / self.counts[kind]
        return None


@contextmanager
def question_log(path: Path, curves: TopKCurves) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A callback writing each question's record as a JSON line and adding it to ``curves``."""
    with open(path, "w", encoding="utf-8") as handle:

        def write(record: dict[str, Any]) -> None:
            handle.write(json.dumps(record) + "\n")
            curves.add(record)

        yield write


def plot_topk(curves: Mapping[str, Mapping[str, TopKCurves]], path: Path) -> Path:
    """``topk.png``: one panel per split, one line per run, k = 1..CURVE_K on a log axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(dict.fromkeys(split for by_split in curves.values() for split in by_split))
    figure = Figure(figsize=(5.5 * len(splits), 4.2))
    FigureCanvasAgg(figure)
    for i, split in enumerate(splits, start=1):
        axes = figure.add_subplot(1, len(splits), i)
        label = None
        for name, by_split in curves.items():
            found = by_split[split].curve() if split in by_split else None
            if found is None:
                continue
            label, values = found
            axes.plot(np.arange(1, len(values) + 1), values, label=name)
        axes.set_xscale("log")
        axes.set_xlim(1, CURVE_K)
        axes.set_ylim(0, 1)
        axes.set_xlabel("k")
        axes.set_ylabel(label or "no scorable questions")
        axes.set_title(split)
        axes.grid(True, which="both", alpha=0.3)
        if label is not None:
            axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
