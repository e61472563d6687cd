"""Check a reproduction recipe: compare the scores its artifacts hold with the ones its expected.toml records.

A recipe is data, in the manner of pyserini's reproduction matrices. ``pipelines/<name>/expected.toml``
lists the stages in order; each stage names the commands that build it (the Makefile beside it runs the
same commands, one make target per stage), the artifact directory it leaves under the work folder, and
the scores that artifact must hold, each within a tolerance, with the published number where one exists::

    [recipe]
    name = "scifact"
    description = "..."

    [[stage]]
    name = "bm25"                      # also the make target
    artifact = "eval-bm25"             # directory under WORK
    metrics_file = "metrics.json"      # or "manifest.json": the manifest's `metrics` member
    tolerance = 0.005                  # default for the stage's scores
    wall_seconds = 10                  # measured on 2 CPU cores
    commands = ["$(RAGKIT) mine ...", "$(RAGKIT) evaluate ..."]

    [[stage.score]]                    # metrics[split][metric]
    split = "dev"                      # (with `run = "bm25"`: metrics[run][split][metric], the layout of
                                       # `ragkit evaluate` given several runs)
    metric = "ndcg@10"
    expected = 0.6989
    reference = 0.665                  # optional: the literature's number, shown beside ours
    reference_source = "..."

    [[stage.count]]                    # the artifact manifest's counts[name] (or counts[name][split]), exact
    name = "passages"
    expected = 5183

Usage::

    python pipelines/check.py pipelines/scifact/expected.toml              # table; exit 1 on FAIL / MISSING
    python pipelines/check.py pipelines/scifact/expected.toml --stage bm25
    python pipelines/check.py pipelines/scifact/expected.toml --dry-run    # the commands, nothing run

A score is OK when ``|got - expected| <= tolerance``; a metrics file that is not there is one MISSING line
naming the make target that writes it. Exit status: 0 when every checked score is OK, 1 when one is FAIL
or MISSING, 2 when the recipe itself is malformed (one line naming the file, line and fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from ragkit.errors import RagkitError, located

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# The recipes' make variables and their Makefile defaults (paths relative to the recipe's directory).
DEFAULTS = {
    "RAGKIT": "../../.venv/bin/ragkit",
    "DATA": "../../../shared/datasets",
    "WORK": "./work",
}
METRICS_FILES = ("metrics.json", "manifest.json")
# The keys each table may hold: a misspelt one is refused rather than silently ignored.
KEYS = {
    "recipe": {"name", "description"},
    "stage": {"name", "artifact", "metrics_file", "tolerance", "wall_seconds", "commands", "score", "count"},
    "score": {"split", "metric", "expected", "tolerance", "reference", "reference_source", "run"},
    "count": {"name", "split", "expected", "reference", "reference_source"},
}
# Float slack on the tolerance, so a delta equal to the tolerance up to rounding still passes.
SLACK = 1e-9
_VARIABLE = re.compile(r"\$\((\w+)\)")


@dataclasses.dataclass(frozen=True)
class Expectation:
    """One number a stage's artifact must hold: a metric of a split, or a count of the manifest."""

    stage: str
    kind: Literal["score", "count"]
    """'score' (metrics[split][name]) or 'count' (manifest counts[name], or counts[name][split])."""
    name: str
    split: str | None
    expected: float
    tolerance: float
    reference: float | None = None
    reference_source: str | None = None
    run: str | None = None
    """A score of one run in a multi-run metrics.json (metrics[run][split][name])."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    artifact: str
    metrics_file: str
    commands: tuple[str, ...]
    expectations: tuple[Expectation, ...]
    wall_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    description: str
    stages: tuple[Stage, ...]

    @property
    def directory(self) -> Path:
        return self.path.parent

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages)
        raise RagkitError(f"{self.path}: no stage '{name}' (stages: {known})")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result of checking one expectation: status OK, FAIL or MISSING (got None)."""

    expectation: Expectation
    status: str
    got: float | None = None
    source_missing: bool = False
    """MISSING because its whole file is absent or unreadable (reported once per file, not per row)."""

    @property
    def delta(self) -> float | None:
        return None if self.got is None else self.got - self.expectation.expected


# --- reading a recipe --------------------------------------------------------------------------------


class _Where:
    """Names a place in the recipe as ``file:line: stage 'x', score 2`` for one-line errors.

    tomllib keeps no line numbers, so the line of an entry is found from the order of the
    ``[[stage]]`` / ``[[stage.score]]`` / ``[[stage.count]]`` headers in the text.
    """

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.headers = [(m.group(1), text.count("\n", 0, m.start()) + 1)
                        for m in re.finditer(r"(?m)^[ \t]*\[\[[ \t]*(stage(?:\.score|\.count)?)[ \t]*\]\]", text)]

    def line(self, stage: int | None, kind: str | None = None, entry: int | None = None) -> int | None:
        """Line of the 1-based ``stage`` table, or of its ``entry``-th ``kind`` table."""
        if stage is None:
            return None
        starts = [i for i, (name, _) in enumerate(self.headers) if name == "stage"]
        if stage > len(starts):
            return None
        at = starts[stage - 1]
        if kind is None:
            return self.headers[at][1]
        end = starts[stage] if stage < len(starts) else len(self.headers)
        lines = [line for name, line in self.headers[at + 1 : end] if name == f"stage.{kind}"]
        return lines[entry - 1] if entry is not None and entry <= len(lines) else None

    def error(self, message: str, stage: int | None = None, kind: str | None = None, entry: int | None = None) -> RagkitError:
        return located(self.path, self.line(stage, kind, entry), message)


def _field(table: dict, key: str, kind: type | tuple[type, ...], fail: Any, fix: str, default: Any = ...) -> Any:
    """``table[key]`` checked against ``kind``; ``fail(message)`` builds the error."""
    if key not in table:
        if default is not ...:
            return default
        raise fail(f"missing '{key}' ({fix})")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise fail(f"'{key}' = {value!r} has the wrong type ({fix})")
    return value


def _known_keys(table: dict, kind: str, fail: Any) -> None:
    unknown = sorted(set(table) - KEYS[kind])
    if unknown:
        raise fail(f"unknown key '{unknown[0]}' (a {kind} table holds {', '.join(sorted(KEYS[kind]))})")


def _expectations(where: _Where, index: int, stage: str, table: dict, tolerance: float | None) -> list[Expectation]:
    out = []
    for kind in ("score", "count"):
        entries = table.get(kind, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise where.error(f"stage '{stage}': '{kind}' must be tables written [[stage.{kind}]]", index)
        for number, entry in enumerate(entries, start=1):
            def fail(message: str, kind: str = kind, number: int = number) -> RagkitError:
                return where.error(f"stage '{stage}', {kind} {number}: {message}", index, kind, number)

            _known_keys(entry, kind, fail)
            if kind == "score":
                name = _field(entry, "metric", str, fail, "name the metric, e.g. metric = \"ndcg@10\"")
                split = _field(entry, "split", str, fail, "name the split, e.g. split = \"dev\"")
                own = _field(entry, "tolerance", (int, float), fail, "tolerance is a number", tolerance)
                if own is None:
                    raise fail("no tolerance (set tolerance = <number> here or on its stage)")
            else:
                name = _field(entry, "name", str, fail, "name the count, e.g. name = \"passages\"")
                split = _field(entry, "split", str, fail, "split is text", None)
                own = 0.0  # a count is exact: a changed count means changed data, not noise
            expected = float(_field(entry, "expected", (int, float), fail, "set expected = <the number measured>"))
            if not (math.isfinite(expected) and math.isfinite(own) and own >= 0):
                raise fail("expected and tolerance must be finite numbers, tolerance >= 0")
            reference = _field(entry, "reference", (int, float), fail, "reference is a number", None)
            source = _field(entry, "reference_source", str, fail, "reference_source is text", None)
            if reference is not None and source is None:
                raise fail("a reference needs reference_source (say where the number is published)")
            run = _field(entry, "run", str, fail, "run is text", None) if kind == "score" else None
            out.append(Expectation(stage, kind, name, split, expected, float(own),
                                   None if reference is None else float(reference), source, run))
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate an expected.toml; a malformed one raises a one-line :class:`RagkitError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RagkitError(f"{path}: no such recipe (pass a pipelines/<name>/expected.toml)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RagkitError(f"{path}: invalid TOML ({exc}); fix the syntax") from None
    where = _Where(path, text)
    head = data.get("recipe")
    if not isinstance(head, dict):
        raise where.error("no [recipe] table (add one with name and description)")
    _known_keys(head, "recipe", where.error)
    name = _field(head, "name", str, where.error, "name the recipe")
    description = _field(head, "description", str, where.error, "describe the recipe in a line")
    tables = data.get("stage")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise where.error("no [[stage]] tables (list the stages in the order they run)")
    stages, seen = [], set()
    for index, table in enumerate(tables, start=1):
        def fail(message: str, index: int = index) -> RagkitError:
            label = table.get("name") if isinstance(table.get("name"), str) else index
            return where.error(f"stage '{label}': {message}", index)

        _known_keys(table, "stage", fail)
        stage_name = _field(table, "name", str, fail, "name the stage after its make target")
        if stage_name in seen:
            raise fail("named twice (stage names are make targets and must be unique)")
        seen.add(stage_name)
        commands = _field(table, "commands", list, fail, "list the commands its make target runs")
        if not commands or not all(isinstance(c, str) and c.strip() for c in commands):
            raise fail("'commands' must be a non-empty list of command strings")
        for command in commands:
            for variable in _VARIABLE.findall(command):
                if variable not in DEFAULTS:
                    raise fail(f"unknown variable $({variable}) (use {', '.join(f'$({v})' for v in DEFAULTS)})")
        metrics_file = _field(table, "metrics_file", str, fail, "metrics.json or manifest.json", "metrics.json")
        if metrics_file not in METRICS_FILES:
            raise fail(f"metrics_file = {metrics_file!r} is not one of {', '.join(METRICS_FILES)}")
        tolerance = _field(table, "tolerance", (int, float), fail, "tolerance is a number", None)
        seconds = _field(table, "wall_seconds", (int, float), fail, "wall_seconds is a number", None)
        stages.append(Stage(
            name=stage_name,
            artifact=_field(table, "artifact", str, fail, "name the artifact directory under WORK"),
            metrics_file=metrics_file,
            commands=tuple(commands),
            expectations=tuple(_expectations(where, index, stage_name, table, tolerance)),
            wall_seconds=None if seconds is None else float(seconds),
        ))
    return Recipe(path=path, name=name, description=description, stages=tuple(stages))


# --- comparing ---------------------------------------------------------------------------------------


def compare(expected: float, got: float, tolerance: float) -> str:
    """OK when ``got`` lies within ``tolerance`` of ``expected`` (NaN never does), else FAIL."""
    return "OK" if abs(got - expected) <= tolerance + SLACK else "FAIL"


def _load_numbers(path: Path, member: str | None) -> tuple[Any, str]:
    """(the JSON of ``path``, or its ``member`` table; '') or (None, why the file cannot be used)."""
    if not path.is_file():
        return None, "not found"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({exc})"
    if member is not None:
        data = data.get(member) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            return None, f"has no '{member}' table"
    return data, ""


def _lookup(table: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(table, dict) or key not in table:
            return None
        table = table[key]
    return table


def check_stage(stage: Stage, work: Path) -> tuple[list[Outcome], list[str]]:
    """Outcomes of a stage's expectations against its artifact under ``work``, and a line per unusable file.

    When a file is absent every expectation that needs it is MISSING and the file is named once.
    """
    artifact = work / stage.artifact
    score_member = "metrics" if stage.metrics_file == "manifest.json" else None
    sources = {"score": (artifact / stage.metrics_file, score_member), "count": (artifact / "manifest.json", "counts")}
    loaded: dict[tuple[Path, str | None], tuple[Any, str]] = {}
    outcomes: list[Outcome] = []
    problems: list[str] = []
    for item in stage.expectations:
        source = sources[item.kind]
        if source not in loaded:
            loaded[source] = _load_numbers(*source)
            if loaded[source][1]:
                problems.append(f"{source[0]} {loaded[source][1]}")
        data, problem = loaded[source]
        if problem:
            outcomes.append(Outcome(item, "MISSING", source_missing=True))
            continue
        keys = [item.run, item.split, item.name] if item.kind == "score" else [item.name, item.split]
        got = _lookup(data, [k for k in keys if k is not None])
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            outcomes.append(Outcome(item, "MISSING"))
            continue
        outcomes.append(Outcome(item, compare(item.expected, float(got), item.tolerance), float(got)))
    return outcomes, problems


def check(recipe: Recipe, work: Path, stages: Sequence[str] = ()) -> tuple[list[Outcome], list[str]]:
    """Check the named stages (all when empty): every outcome, and a line per missing file with its fix."""
    chosen = [recipe.stage(name) for name in stages] if stages else list(recipe.stages)
    outcomes, missing = [], []
    for stage in chosen:
        stage_outcomes, stage_missing = check_stage(stage, work)
        outcomes += stage_outcomes
        make = f"make {stage.name}" if recipe.directory == Path(".") else f"make -C {recipe.directory} {stage.name}"
        missing += [f"MISSING {stage.name}: {line} (run `{make}`)" for line in stage_missing]
    return outcomes, missing


# --- printing ----------------------------------------------------------------------------------------


def _number(value: float | None, kind: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    digits = 0 if kind == "count" else 4
    # Adding 0.0 turns the -0.0 of a rounded tiny negative delta into 0.0, printed +0.0000.
    value = round(value, digits) + 0.0
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_outcomes(outcomes: Sequence[Outcome]) -> str:
    """The comparison table: stage, split, metric, expected, got, delta, tolerance, status (and reference).

    Outcomes whose whole file is missing get no row: that file's MISSING line stands for them.
    """
    outcomes = [o for o in outcomes if not o.source_missing]
    header = ["stage", "split", "metric", "expected", "got", "delta", "tol", "status"]
    with_reference = any(o.expectation.reference is not None for o in outcomes)
    if with_reference:
        header.append("reference")
    rows = []
    for o in outcomes:
        e = o.expectation
        split = f"{e.run}:{e.split}" if e.run else (e.split or "-")
        row = [e.stage, split, e.name, _number(e.expected, e.kind), _number(o.got, e.kind),
               _number(o.delta, e.kind, signed=True), f"{e.tolerance:g}", o.status]
        if with_reference:
            row.append(f"{e.reference:g} ({e.reference_source})" if e.reference is not None else "")
        rows.append(row)
    numeric = {3, 4, 5, 6}
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome]) -> str:
    counts = {status: sum(o.status == status for o in outcomes) for status in ("OK", "FAIL", "MISSING")}
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def exit_status(outcomes: Sequence[Outcome]) -> int:
    return 0 if all(o.status == "OK" for o in outcomes) else 1


def substitute(command: str, variables: dict[str, str]) -> str:
    """Expand the recipe's make variables, e.g. ``$(WORK)``."""
    return _VARIABLE.sub(lambda m: variables[m.group(1)], command)


def dry_run(recipe: Recipe, variables: dict[str, str], stages: Sequence[str] = ()) -> str:
    """The recipe's commands in order, as a shell script run from the recipe's directory."""
    chosen = [recipe.stage(name) for name in stages] if stages else list(recipe.stages)
    lines = [f"# {recipe.name}: {recipe.description}", f"cd {recipe.directory.resolve()}"]
    for stage in chosen:
        took = f" (about {stage.wall_seconds:.0f} s on 2 CPU cores)" if stage.wall_seconds is not None else ""
        lines.append(f"# {stage.name}{took}")
        lines += [substitute(command, variables) for command in stage.commands]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare a recipe's scores with its expected.toml.")
    parser.add_argument("recipe", type=Path, help="pipelines/<name>/expected.toml")
    parser.add_argument("--work", type=Path, help="the recipe's work folder (default: work/ beside the recipe)")
    parser.add_argument("--stage", action="append", default=[], help="check only this stage (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the recipe's commands and run nothing")
    parser.add_argument("--ragkit", help=f"$(RAGKIT) for --dry-run (default {DEFAULTS['RAGKIT']})")
    parser.add_argument("--data", type=Path, help=f"$(DATA) for --dry-run (default {DEFAULTS['DATA']})")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        if args.dry_run:
            variables = dict(DEFAULTS)
            # Paths given here are relative to where check.py runs; the printed script runs in the recipe's
            # folder, so they are made absolute (a bare `ragkit` stays a command looked up on PATH).
            if args.ragkit is not None:
                variables["RAGKIT"] = str(Path(args.ragkit).resolve()) if "/" in args.ragkit else args.ragkit
            for variable, value in (("DATA", args.data), ("WORK", args.work)):
                if value is not None:
                    variables[variable] = str(value.resolve())
            print(dry_run(recipe, variables, args.stage))
            return 0
        work = args.work if args.work is not None else recipe.directory / DEFAULTS["WORK"]
        outcomes, missing = check(recipe, work, args.stage)
    except RagkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{recipe.name}: {recipe.path} against {work}")
    if any(not o.source_missing for o in outcomes):
        print(format_outcomes(outcomes))
    for line in missing:
        print(line)
    print(summary(outcomes))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
