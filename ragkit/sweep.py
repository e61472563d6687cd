"""``ragkit sweep``: train a retriever under several settings and seeds, and name the best on validation.

A sweep file (TOML) holds the mine artifact, an output directory, the ``train retriever`` settings every
run shares (``[train]``) and what varies: a ``[grid]`` of lists (every combination) and/or a list of
``[[runs]]`` tables, each crossed with ``seeds``::

    mine = "pipelines/squadshifts/work/mine"
    out = "pipelines/squadshifts/work/sweep"
    seeds = [0]
    select = "ndcg@10"

    [train]
    model = "minilm"
    batch_size = 32
    precision = "bf16"

    [grid]
    lr = [5e-5, 1e-4]
    temperature = [0.05, 0.02]

Each run lives in ``<out>/<name>/`` (``name`` spells its settings, e.g. ``lr=0.0001_seed=0``): the
``train-retriever`` artifact in ``retriever/``, the dev split searched with it (``ragkit index``) in
``index/`` and scored (``ragkit evaluate``) in ``eval/``, and ``result.json``. A run whose
``result.json`` exists is skipped, so an interrupted sweep continues where it stopped; a run whose
training finished but not its dev evaluation only evaluates.

Validation metrics are the ones training recorded for the kept model (its manifest's ``validation``
metrics, present when the ingest artifact has a ``validation`` split). The winner is the setting with the
best mean validation ``select`` metric over its seeds; dev metrics are reported beside it and never
used to choose; when settings ran on different seeds they are compared on the seeds all of them share.
``--shard I/N`` lets N processes (or machines) share one sweep directory, each training every N-th run;
``--report-only`` writes the tables from the runs finished so far. ``<out>/sweep.csv`` has one row per
run, ``sweep.md`` the mean ± standard deviation (over seeds, n - 1 denominator) per setting, ``sweep.png``
each run's validation curve against the questions trained on (steps x batch size, with ``eval_every``)
and the final scores against training time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .artifacts import Manifest, write_json_atomic, write_text_atomic
from .config import EvaluateConfig, HybridConfig, IndexConfig, TrainRetrieverConfig, read_toml
from .errors import RagkitError

RESULT = "result.json"
VALIDATION = "validation"
FIXED = ("mine", "out", "seed", "overwrite", "resume")
"""Training settings the sweep sets itself, per run."""
TOP20 = ("accuracy@20", "recall@20")
"""The top-20 column: answer accuracy where questions have answers, else recall of judged passages."""


@dataclasses.dataclass
class SweepSpec:
    """A parsed sweep file: what to train, under which settings and seeds, and how to choose."""

    mine: str
    out: str
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    select: str = "auto"
    """Validation metric that names the winner; auto: the one training selected its kept model by."""
    dev_split: str = "dev"
    threads: int = 0
    """torch threads for every run (0: torch's default)."""
    hybrid: bool = True
    """Also fuse each run with BM25 (``ragkit hybrid``, alpha tuned on validation) and report it on dev."""
    source: str = "<sweep>"

    def __post_init__(self) -> None:
        where = self.source
        known = {f.name for f in dataclasses.fields(TrainRetrieverConfig)} - set(FIXED)
        tables = [("train", self.train), ("grid", self.grid)] + [(f"runs[{i}]", r) for i, r in enumerate(self.runs)]
        for table, settings in tables:
            if not isinstance(settings, dict):
                raise RagkitError(f"{where}: [{table}] must be a table of train retriever settings")
            for key in settings:
                if key.replace("-", "_") not in known and not (key == "seeds" and table.startswith("runs")):
                    hint = "set seeds at top level" if key == "seed" else f"known: {', '.join(sorted(known))}"
                    raise RagkitError(f"{where}: [{table}] has '{key}', not a train retriever setting the sweep can vary ({hint})")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise RagkitError(f"{where}: [grid] {key} must be a non-empty list of values")
        for seeds in [self.seeds] + [r["seeds"] for r in self.runs if "seeds" in r]:
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise RagkitError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
            if len(set(seeds)) != len(seeds):
                raise RagkitError(f"{where}: seeds repeats a seed ({seeds})")
        if self.threads < 0:
            raise RagkitError(f"{where}: threads must be >= 0")
        settings = self.settings()
        names = [setting_name(s) for s in settings]
        if len(set(names)) != len(names):
            raise RagkitError(f"{where}: two runs have the same settings ({', '.join(n for n in names if names.count(n) > 1)})")
        for setting in settings:  # a bad value fails now, not after hours of earlier runs
            try:
                train_config(self, setting, 0, Path(self.out) / "check")
            except RagkitError as exc:
                raise RagkitError(f"{where}: run {setting_name(setting)}: {exc}") from None

    def settings(self) -> list[dict[str, Any]]:
        """What varies per run (before seeds): the grid's combinations, then the listed runs."""
        return [setting for setting, _ in self.plan()]

    def plan(self) -> list[tuple[dict[str, Any], list[int]]]:
        """(setting, seeds) of every run: a listed run may name its own ``seeds``, else the sweep's."""
        combos: list[tuple[dict[str, Any], list[int]]] = []
        if self.grid:
            keys = list(self.grid)
            combos = [(dict(zip(keys, values)), self.seeds) for values in itertools.product(*(self.grid[k] for k in keys))]
        for listed in self.runs:
            setting = {k: v for k, v in listed.items() if k != "seeds"}
            combos.append((setting, listed.get("seeds", self.seeds)))
        return combos or [({}, self.seeds)]


def load_spec(path: str | Path, out: str | None = None) -> SweepSpec:
    """Read a sweep file; ``out`` overrides its output directory."""
    path = Path(path)
    data = read_toml(path, "sweep file not found (check the path)")
    fields = {f.name for f in dataclasses.fields(SweepSpec)} - {"source"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RagkitError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(fields))})")
    for key in ("mine", "out"):
        if key not in data and not (key == "out" and out):
            raise RagkitError(f"{path}: no '{key}' given (add {key} = \"...\" at top level)")
    if out:
        data["out"] = str(out)
    try:
        return SweepSpec(**data, source=str(path))
    except TypeError as exc:
        raise RagkitError(f"{path}: {exc}") from None


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def setting_name(setting: dict[str, Any]) -> str:
    """A run's directory name: its varied settings, sorted, e.g. ``lr=0.0001_temperature=0.02``."""
    text = "_".join(f"{k}={format_value(v)}" for k, v in sorted(setting.items())) or "base"
    return text.replace("/", "-").replace(" ", "")


def train_config(spec: SweepSpec, setting: dict[str, Any], seed: int, out: Path) -> TrainRetrieverConfig:
    values = {**spec.train, **setting}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    try:
        return TrainRetrieverConfig(**values, mine=spec.mine, out=str(out), seed=seed, overwrite=True)
    except TypeError as exc:
        raise RagkitError(str(exc)) from None


# --- one run -----------------------------------------------------------------------------------------


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that make two runs the same run: not where they are written, and the mine artifact by
    its resolved path (a sweep file run from another directory, or naming it absolutely, is the same)."""
    same = {k: v for k, v in config.items() if k not in ("out", "overwrite", "resume")}
    if same.get("mine"):
        same["mine"] = str(Path(same["mine"]).resolve())
    return same


def planned_run(spec: SweepSpec, setting: dict[str, Any], seed: int) -> tuple[str, Path, TrainRetrieverConfig, dict[str, Any]]:
    """A run's name, folder, training config, and the comparable settings (as JSON stores them) that a
    stored retriever or result must match."""
    name = f"{setting_name(setting)}_seed={seed}"
    folder = Path(spec.out) / name
    cfg = train_config(spec, setting, seed, folder / "retriever")
    return name, folder, cfg, json.loads(json.dumps(comparable(dataclasses.asdict(cfg))))


def run_one(spec: SweepSpec, setting: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train, search dev and score one run, unless ``result.json`` says it is done; return its result."""
    from .evaluation import run as evaluate
    from .indexing.hybrid import run as fuse
    from .indexing.stage import run as index
    from .retriever.trainer import run as train

    name, folder, cfg, wanted = planned_run(spec, setting, seed)
    result_path = folder / RESULT
    done = stored_result(spec, setting, seed)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    timing_path = folder / "timing.json"
    retriever = folder / "retriever"
    if not ((retriever / "manifest.json").is_file() and timing_path.is_file()
            and comparable(Manifest.load(retriever).config) == wanted):
        print(f"sweep: training {name}", flush=True)
        started = time.perf_counter()
        train(cfg)
        write_json_atomic(timing_path, {"train_seconds": round(time.perf_counter() - started, 1)})
    timing = json.loads(timing_path.read_text(encoding="utf-8"))
    manifest = Manifest.load(retriever)
    print(f"sweep: searching {VALIDATION} and {spec.dev_split} with {name}", flush=True)
    started = time.perf_counter()
    index(IndexConfig(ingest=spec.mine, model=str(retriever), splits=[VALIDATION, spec.dev_split],
                      out=str(folder / "index"), overwrite=True))
    runs = [f"trained={folder / 'index'}"]
    if spec.hybrid:
        fused = fuse(HybridConfig(dense=str(folder / "index"), bm25=spec.mine, out=str(folder / "hybrid"),
                                  splits=[spec.dev_split], tune_split=VALIDATION, overwrite=True))
        runs.append(f"hybrid={folder / 'hybrid'}")
    scored = evaluate(EvaluateConfig(runs=runs, splits=[spec.dev_split], out=str(folder / "eval"), overwrite=True))
    scores = scored.metrics if spec.hybrid else {"trained": scored.metrics}
    result = {
        "name": name, "setting": setting, "seed": seed, "config": wanted,
        "select_metric": manifest.metrics.get("select_metric"), "best_step": manifest.metrics.get("best_step"),
        "steps": manifest.counts.get("steps"), "epochs": manifest.counts.get("epochs"),
        "train_seconds": timing["train_seconds"], "dev_seconds": round(time.perf_counter() - started, 1),
        "validation": manifest.metrics.get(VALIDATION) or {}, "validation_start": manifest.metrics.get("validation_start"),
        "bm25_validation": manifest.metrics.get("bm25_validation") or {},
        "dev": scores["trained"][spec.dev_split],
        "hybrid_dev": scores["hybrid"][spec.dev_split] if spec.hybrid else {},
        "hybrid_alpha": fused.metrics.get("alpha") if spec.hybrid else None,
        "curve": validation_curve(retriever / "metrics.jsonl"),
    }
    write_json_atomic(result_path, result)
    return result


def validation_curve(log: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of every validation evaluation in a training log."""
    curve = []
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("split") == VALIDATION:
            curve.append((record["step"], {k: v for k, v in record.items() if isinstance(v, float)}))
    return curve


# --- the table ---------------------------------------------------------------------------------------


def top20(metrics: dict[str, Any]) -> str:
    return next((k for k in TOP20 if k in metrics), TOP20[-1])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(spec: SweepSpec, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: mean and standard deviation over its seeds of the metrics and times."""
    select = spec.select if spec.select != "auto" else results[0]["select_metric"]
    rows = []
    for setting in spec.settings():
        runs = [r for r in results if r["setting"] == setting]
        if not runs:
            continue
        row: dict[str, Any] = {"name": setting_name(setting), "setting": setting, "seeds": len(runs)}
        row["per_seed"] = {r["seed"]: float(r[VALIDATION][select]) for r in runs if select in r[VALIDATION]}
        for split in (VALIDATION, "dev"):
            for metric in dict.fromkeys((select, "ndcg@10", top20(runs[0][split]))):
                values = [r[split].get(metric) for r in runs]
                if any(v is None for v in values):
                    raise RagkitError(f"{spec.source}: {split} metrics have no {metric!r} (choose select from "
                                      f"{', '.join(sorted(k for k in runs[0][split] if '@' in k))})")
                row[f"{split} {metric}"] = mean_std([float(v) for v in values])
        if all(r.get("hybrid_dev") for r in runs):
            for metric in dict.fromkeys((select, "ndcg@10", top20(runs[0]["dev"]))):
                row[f"hybrid-dev {metric}"] = mean_std([float(r["hybrid_dev"][metric]) for r in runs])
        row["train min"] = mean_std([r["train_seconds"] / 60 for r in runs])
        rows.append(row)
    return rows


def shared_seeds(rows: list[dict[str, Any]]) -> list[int]:
    """The seeds every row has run (sorted); settings are compared on these, so a setting run on more
    seeds, or on luckier ones, gains nothing from it."""
    common = set.intersection(*(set(row["per_seed"]) for row in rows)) if rows else set()
    return sorted(common)


def winner(rows: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """The row with the best validation ``select`` metric, averaged over the seeds every row shares (over
    each row's own seeds when none is shared; ties: the first listed). Dev is not read."""
    seeds = shared_seeds(rows)

    def score(row: dict[str, Any]) -> float:
        values = [row["per_seed"][s] for s in seeds] if seeds else list(row["per_seed"].values())
        return statistics.fmean(values)

    return max(rows, key=score)


def cell(value: Any, seeds: int, digits: int = 3) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], best: dict[str, Any], select: str, baselines: dict[str, dict[str, Any]]) -> str:
    columns = [c for c in rows[0] if c not in ("name", "setting", "per_seed")]
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        marker = " **(winner)**" if row is best else ""
        values = [cell(row[c], row["seeds"], 1 if c == "train min" else 3) for c in columns]
        label = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(row["setting"].items())) or "base"
        lines.append("| " + " | ".join([label] + values) + marker + " |")
    for label, split_metrics in baselines.items():
        values = []
        for c in columns:
            split, _, metric = c.partition(" ")
            found = split_metrics.get(split, {}).get(metric)
            values.append(f"{found:.3f}" if isinstance(found, (int, float)) and c != "seeds" else "")
        lines.append("| " + " | ".join([label] + values) + " |")
    lines.append("")
    seeds = shared_seeds(rows)
    basis = (f"compared on the seed{'s' if len(seeds) > 1 else ''} every setting ran: {', '.join(map(str, seeds))}"
             if seeds else "no seed shared by every setting: each compared on its own seeds")
    lines.append(f"Winner on validation {select}: `{best['name']}` ({basis}; dev is reported, never used to choose).")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    keys = sorted({k for r in results for k in r["setting"]})
    metrics = sorted({m for r in results for m in r[VALIDATION] if "@" in m})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(keys + ["seed", "steps", "best_step", "train_seconds", "dev_seconds", "hybrid_alpha"]
                    + [f"{split} {m}" for split in (VALIDATION, "dev", "hybrid-dev") for m in metrics])
    for r in results:
        writer.writerow([format_value(r["setting"].get(k, "")) for k in keys]
                        + [r["seed"], r["steps"], r["best_step"], r["train_seconds"], r["dev_seconds"], r.get("hybrid_alpha", "")]
                        + [r[split].get(m, "") for split in (VALIDATION, "dev", "hybrid_dev") for m in metrics])
    write_text_atomic(path, buffer.getvalue())


def plot(path: Path, results: list[dict[str, Any]], select: str, bm25: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(results) + 2) // 3  # legend lines under the plots, three runs per line
    fig, (curves, final) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.18 * rows))
    colours = plt.get_cmap("tab20" if len(results) > 10 else "tab10")
    for i, r in enumerate(results):
        # Against questions trained on (steps x batch), so runs of different batch sizes line up.
        batch = int(r.get("config", {}).get("batch_size") or 1)
        points = [(step * batch, m[select]) for step, m in r["curve"] if select in m]
        if r.get("validation_start") and select in r["validation_start"]:
            points = [(0, r["validation_start"][select])] + points
        if points:
            curves.plot(*zip(*points), marker="o", markersize=4, color=colours(i % colours.N), label=r["name"])
        final.scatter(r["train_seconds"] / 60, r[VALIDATION][select], color="tab:blue")
        final.scatter(r["train_seconds"] / 60, r["dev"][select], color="tab:orange", marker="x")
    for axes, split in ((curves, VALIDATION), (final, VALIDATION), (final, "dev")):
        if select in bm25.get(split, {}):
            axes.axhline(bm25[split][select], linestyle="--", color="grey" if split == VALIDATION else "tab:orange",
                         linewidth=1, label=f"BM25 {split}")
    curves.set(xlabel="training questions seen (steps x batch size)", ylabel=f"validation {select}", title="validation during training")
    handles, labels = curves.get_legend_handles_labels()
    final.scatter([], [], color="tab:blue", label="validation (kept model)")
    final.scatter([], [], color="tab:orange", marker="x", label="dev")
    final.set(xlabel="training wall time (min)", ylabel=select, title="kept model of each run")
    final.legend(fontsize=7)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.18 * rows / (4.5 + 0.18 * rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N): this process trains the runs whose position in the plan is I modulo N."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise RagkitError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. --shard 0/2 and --shard 1/2 on two machines)")
    return shard


def stored_result(spec: SweepSpec, setting: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """A finished run's result, or None while it has none; a result of other settings is refused."""
    _, folder, _, wanted = planned_run(spec, setting, seed)
    path = folder / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("config") != wanted:
        raise RagkitError(f"{path}: was trained with other settings than {spec.source} asks for "
                          f"(remove {path.parent} to retrain it)")
    return result


def run(spec: SweepSpec, shard: tuple[int, int] | None = None, train: bool = True) -> dict[str, Any]:
    """Run (or resume) every run of the sweep; write the tables and the plot; return the winning row.

    ``shard=(i, n)`` trains only the runs at positions ``i mod n`` of the plan (several processes or
    machines share one sweep directory); ``train=False`` trains nothing. Either way the tables cover every
    finished run, and ``sweep.md`` names the runs still missing."""
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    out = Path(spec.out)
    mine = Manifest.load(spec.mine)
    ingest = mine.upstream("ingest")
    for split in (VALIDATION, spec.dev_split):
        if not (ingest / "questions" / split).is_dir():
            raise RagkitError(f"{ingest}: has no {split} questions, so the sweep cannot "
                              + ("choose without looking at dev (re-ingest with --validation-fraction)"
                                 if split == VALIDATION else "report dev (set dev_split to a split it has)"))
    planned = [(setting, seed) for setting, seeds in spec.plan() for seed in seeds]
    results, missing = [], []
    for position, (setting, seed) in enumerate(planned):
        mine_to_train = train and (shard is None or position % shard[1] == shard[0])
        result = run_one(spec, setting, seed) if mine_to_train else stored_result(spec, setting, seed)
        if result is None:
            missing.append(f"{setting_name(setting)}_seed={seed}")
        else:
            results.append(result)
    if not results:
        raise RagkitError(f"{spec.source}: no run has finished yet in {spec.out} (train them first, without --report-only)")
    select = spec.select if spec.select != "auto" else results[0]["select_metric"]
    rows = summarise(spec, results)
    best = winner(rows, select)
    baselines = {"BM25": {split: mine.metrics.get(split, {}) for split in (VALIDATION, "dev")}}
    start = next((r["validation_start"] for r in results if r.get("validation_start")), None)
    if start:
        baselines["untrained"] = {VALIDATION: start}
    write_csv(out / "sweep.csv", results)
    table = markdown(rows, best, select, baselines)
    if missing:
        table += f"\nNot finished yet ({len(missing)} of {len(planned)} runs): {', '.join(missing)}.\n"
    write_text_atomic(out / "sweep.md", table)
    plot(out / "sweep.png", results, select, baselines["BM25"])
    write_json_atomic(out / "sweep.json", {"select": select, "winner": best["name"], "setting": best["setting"],
                                           "rows": rows})
    return best
