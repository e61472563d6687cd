"""pipelines/check.py: comparison within tolerance, MISSING reporting, dry run; every recipe's expected.toml."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ragkit import ingest
from ragkit.errors import RagkitError
from ragkit.evaluation import RetrievalMetrics

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
DATASETS = ROOT.parent / "shared" / "datasets"
RECIPES = sorted(PIPELINES.glob("*/expected.toml"))


def _load_check():
    spec = importlib.util.spec_from_file_location("pipelines_check", PIPELINES / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


check = _load_check()

RECIPE = """\
[recipe]
name = "toy"
description = "a synthetic recipe"

[[stage]]
name = "ingest"
artifact = "ingest"
commands = ["$(RAGKIT) ingest $(DATA)/toy --out $(WORK)/ingest"]

[[stage.count]]
name = "passages"
expected = 40

[[stage.count]]
name = "questions"
split = "dev"
expected = 5

[[stage]]
name = "bm25"
artifact = "eval"
tolerance = 0.01
commands = ["$(RAGKIT) mine $(WORK)/ingest --out $(WORK)/mine", "$(RAGKIT) evaluate $(WORK)/mine --out $(WORK)/eval"]

[[stage.score]]
split = "dev"
metric = "ndcg@10"
expected = 0.50
reference = 0.6
reference_source = "a paper"

[[stage.score]]
split = "dev"
metric = "mrr@10"
expected = 0.40
tolerance = 0.001

[[stage]]
name = "dense"
artifact = "retriever"
metrics_file = "manifest.json"
tolerance = 0.05
commands = ["$(RAGKIT) train retriever $(WORK)/mine --out $(WORK)/retriever"]

[[stage.score]]
split = "dev"
metric = "ndcg@10"
expected = 0.70
"""


def write_recipe(tmp_path, text=RECIPE):
    path = tmp_path / "toy" / "expected.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_artifacts(work, ndcg=0.50, mrr=0.40, dense_ndcg=0.70, passages=40):
    for name, data in (
        ("ingest/manifest.json", {"stage": "ingest", "counts": {"passages": passages, "questions": {"dev": 5}}}),
        ("eval/metrics.json", {"dev": {"questions": 5, "ndcg@10": ndcg, "mrr@10": mrr}}),
        ("eval/manifest.json", {"stage": "evaluate", "counts": {"questions": {"dev": 5}}}),
        ("retriever/manifest.json", {"stage": "train-retriever", "metrics": {"dev": {"ndcg@10": dense_ndcg}}}),
    ):
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")


def statuses(outcomes):
    return [(o.expectation.stage, o.expectation.name, o.status) for o in outcomes]


# --- comparison ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "got", "tolerance", "status"),
    [
        (0.5, 0.5, 0.0, "OK"),
        (0.5, 0.505, 0.005, "OK"),  # exactly at the tolerance, above
        (0.5, 0.495, 0.005, "OK"),  # exactly at the tolerance, below
        (0.6989, 0.6939, 0.005, "OK"),  # a boundary that float subtraction overshoots by ~1e-16
        (0.5, 0.50501, 0.005, "FAIL"),
        (0.5, 0.49499, 0.005, "FAIL"),
        (0.5, 0.5000001, 0.0, "FAIL"),
        (5183, 5182, 0.0, "FAIL"),
        (0.5, float("nan"), 0.1, "FAIL"),
    ],
)
def test_compare_tolerance_boundaries(expected, got, tolerance, status):
    assert check.compare(expected, got, tolerance) == status


def test_check_passes_fails_and_reports_missing_metric(tmp_path):
    recipe = check.load_recipe(write_recipe(tmp_path))
    work = tmp_path / "work"
    write_artifacts(work)
    outcomes, missing = check.check(recipe, work)
    assert missing == []
    assert all(o.status == "OK" for o in outcomes) and len(outcomes) == 5
    assert check.exit_status(outcomes) == 0

    # mrr@10 is 0.0015 off with its own tolerance 0.001; ndcg@10 0.009 off within the stage's 0.01.
    write_artifacts(work, ndcg=0.509, mrr=0.4015, dense_ndcg=0.66, passages=41)
    outcomes, missing = check.check(recipe, work)
    assert statuses(outcomes) == [
        ("ingest", "passages", "FAIL"), ("ingest", "questions", "OK"),
        ("bm25", "ndcg@10", "OK"), ("bm25", "mrr@10", "FAIL"), ("dense", "ndcg@10", "OK"),
    ]
    assert outcomes[3].delta == pytest.approx(0.0015)
    assert check.exit_status(outcomes) == 1

    # A metric absent from an existing file is a MISSING row, not a crash.
    (work / "eval" / "metrics.json").write_text(json.dumps({"dev": {"ndcg@10": 0.5}}), encoding="utf-8")
    outcomes, missing = check.check(recipe, work, ["bm25"])
    assert statuses(outcomes) == [("bm25", "ndcg@10", "OK"), ("bm25", "mrr@10", "MISSING")]
    assert missing == [] and not outcomes[1].source_missing
    assert "MISSING" in check.format_outcomes(outcomes)


def test_scores_of_one_run_in_a_multi_run_metrics_file(tmp_path):
    # `ragkit evaluate A B` writes metrics[run][split][metric]; `run = "..."` picks a column.
    text = RECIPE.replace('split = "dev"\nmetric = "ndcg@10"\nexpected = 0.50', 'run = "hybrid"\nsplit = "dev"\nmetric = "ndcg@10"\nexpected = 0.50')
    recipe = check.load_recipe(write_recipe(tmp_path, text))
    assert [e.run for e in recipe.stage("bm25").expectations] == ["hybrid", None]
    work = tmp_path / "work"
    write_artifacts(work)
    (work / "eval" / "metrics.json").write_text(json.dumps({"bm25": {"dev": {"ndcg@10": 0.4}}, "hybrid": {"dev": {"ndcg@10": 0.505}}}))
    outcomes, _ = check.check(recipe, work, ["bm25"])
    assert [(o.expectation.name, o.status, o.got) for o in outcomes] == [("ndcg@10", "OK", 0.505), ("mrr@10", "MISSING", None)]
    assert "hybrid:dev" in check.format_outcomes(outcomes)


def test_missing_files_are_one_line_each(tmp_path):
    recipe = check.load_recipe(write_recipe(tmp_path))
    work = tmp_path / "work"
    write_artifacts(work)
    shutil.rmtree(work / "eval")
    (work / "retriever" / "manifest.json").write_text("{not json", encoding="utf-8")
    outcomes, missing = check.check(recipe, work)
    assert statuses(outcomes)[2:] == [("bm25", "ndcg@10", "MISSING"), ("bm25", "mrr@10", "MISSING"),
                                      ("dense", "ndcg@10", "MISSING")]
    assert len(missing) == 2
    assert missing[0].startswith("MISSING bm25: ") and "eval/metrics.json not found" in missing[0]
    assert f"make -C {recipe.directory} bm25" in missing[0]
    assert missing[1].startswith("MISSING dense: ") and "unreadable" in missing[1]
    # Their rows stay out of the table: the one line per file stands for them.
    table = check.format_outcomes(outcomes)
    assert "MISSING" not in table and "passages" in table


def test_main_prints_table_and_exit_status(tmp_path, capsys):
    path = write_recipe(tmp_path)
    work = tmp_path / "work"
    write_artifacts(work)
    assert check.main([str(path), "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "5 OK, 0 FAIL, 0 MISSING" in out
    row = next(line for line in out.splitlines() if line.startswith("bm25") and "ndcg@10" in line)
    assert row.split()[3:8] == ["0.5000", "0.5000", "+0.0000", "0.01", "OK"]
    assert "0.6 (a paper)" in row

    write_artifacts(work, dense_ndcg=0.6)
    assert check.main([str(path), "--work", str(work)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "4 OK, 1 FAIL, 0 MISSING" in out

    shutil.rmtree(work / "retriever")
    assert check.main([str(path), "--work", str(work), "--stage", "dense"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line for line in lines if line.startswith("MISSING")] == [
        f"MISSING dense: {work / 'retriever' / 'manifest.json'} not found (run `make -C {path.parent} dense`)"
    ]
    assert "Traceback" not in captured.out + captured.err
    assert check.main([str(path), "--work", str(work), "--stage", "bm25"]) == 0


def test_dry_run_prints_commands_in_order_and_runs_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path)
    work = tmp_path / "work"
    assert check.main([str(path), "--dry-run", "--ragkit", "no-such-ragkit", "--work", str(work), "--data", "/d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == [
        f"cd {path.parent.resolve()}",
        "no-such-ragkit ingest /d/toy --out " + f"{work}/ingest",
        f"no-such-ragkit mine {work}/ingest --out {work}/mine",
        f"no-such-ragkit evaluate {work}/mine --out {work}/eval",
        f"no-such-ragkit train retriever {work}/mine --out {work}/retriever",
    ]
    assert not work.exists()
    assert check.main([str(path), "--dry-run", "--stage", "dense"]) == 0
    out = capsys.readouterr().out
    assert "../../.venv/bin/ragkit train retriever ./work/mine --out ./work/retriever" in out and "ragkit mine" not in out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("expected = 0.40\n", ""), ":32: stage 'bm25', score 2: missing 'expected'"),
        (lambda t: t.replace('metric = "mrr@10"', "metric = 3"), ":32: stage 'bm25', score 2: 'metric' = 3 has the wrong type"),
        (lambda t: t.replace("tolerance = 0.05\n", ""), ":44: stage 'dense', score 1: no tolerance"),
        (lambda t: t.replace("$(WORK)/retriever", "$(OUT)/retriever"), ":38: stage 'dense': unknown variable $(OUT)"),
        (lambda t: t.replace('name = "dense"', 'name = "bm25"'), ":38: stage 'bm25': named twice"),
        (lambda t: t.replace('reference = 0.6\n', 'reference = 0.6\nreference_source = 1\n').replace('reference_source = "a paper"\n', ""),
         ":25: stage 'bm25', score 1: 'reference_source' = 1 has the wrong type"),
        (lambda t: t.replace('metrics_file = "manifest.json"', 'metrics_file = "scores.csv"'), ":38: stage 'dense': metrics_file"),
        (lambda t: t.replace("[[stage.count]]\nname", "[[stage.count]\nname", 1), "invalid TOML"),
        (lambda t: t.replace("tolerance = 0.001", "tolerence = 0.001"), ":32: stage 'bm25', score 2: unknown key 'tolerence'"),
        (lambda t: t.replace("expected = 40\n", "expected = 40\ntolerance = 1\n"), ":10: stage 'ingest', count 1: unknown key 'tolerance'"),
    ],
)
def test_malformed_recipe_is_one_line_naming_file_and_line(tmp_path, capsys, edit, message):
    path = write_recipe(tmp_path, edit(RECIPE))
    with pytest.raises(RagkitError, match=None) as info:
        check.load_recipe(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    assert check.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}")


# --- the recipes in pipelines/ -------------------------------------------------------------------------


def evaluate_metric_names():
    """Every key ragkit's retrieval metrics produce (evaluate and the trainer's dev evaluation share them)."""
    metrics = RetrievalMetrics()
    metrics.add(["p1", "p2"], has_answers=True, answer_rank=1, positive_ids=["p1"], ranked_doc_ids=["d1", "d2"],
                doc_ids=["d1"], doc_scores=[1])
    return {key for key in metrics.result() if "@" in key}


def answer_metric_names():
    """Every key `ragkit answer` writes for a split: EM, F1 and recall@n_docs for any n_docs."""
    from ragkit.reader.answer import summarize

    keys = set()
    for n_docs in range(1, 101):
        keys |= set(summarize([{"em": 1.0, "f1": 1.0, "answer_in_passages": 1.0}], n_docs))
    return keys - {"questions", "judged"}


@pytest.fixture(scope="module")
def ingest_counts(tmp_path_factory):
    """The counts an ingest manifest holds, from a tiny BEIR corpus with a dev split."""
    root = tmp_path_factory.mktemp("beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"word{i} shared text"}) + "\n" for i in range(6)))
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"word{i}"}) + "\n" for i in range(6)))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    return ingest([str(root)], str(root.parent / "ingest"), window=0, dev_fraction=0.5).counts


def test_recipes_exist():
    assert {p.parent.name for p in RECIPES} >= {"scifact", "squadshifts", "nq"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_recipe_parses_and_names_what_ragkit_writes(path, ingest_counts):
    recipe = check.load_recipe(path)
    names = [stage.name for stage in recipe.stages]
    assert names[0] == "ingest" and "bm25" in names
    metric_names = evaluate_metric_names() | answer_metric_names()
    splits = {e.split for e in recipe.stage("ingest").expectations if e.kind == "count" and e.name == "questions"}
    assert splits >= {"train", "dev"}
    for stage in recipe.stages:
        for e in stage.expectations:
            if e.kind == "score":
                assert e.name in metric_names, f"{path}: {stage.name} names {e.name}, not a ragkit metric"
                assert e.split in splits, f"{path}: {stage.name} scores split {e.split!r}, which ingest does not count"
                assert 0.0 <= e.expected <= 1.0 and 0.0 < e.tolerance < 0.1
            else:
                assert e.name in ingest_counts
                assert isinstance(ingest_counts[e.name], dict) == (e.split is not None)
    assert not [e for e in recipe.stage("bm25").expectations if e.tolerance > 0.005]


def make_commands(directory: Path, target: str, variables: dict[str, str]) -> list[str]:
    """The ragkit command lines `make -n -B <target>` would run."""
    args = [f"{k}={v}" for k, v in variables.items()]
    out = subprocess.run(["make", "-n", "-B", "-s", "-C", str(directory), target, *args],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(variables["RAGKIT"])]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_makefile_runs_the_recipe_commands(path):
    recipe = check.load_recipe(path)
    variables = {"RAGKIT": "RAGKIT", "DATA": "/data", "WORK": "/work-dir", "PYTHON": "PY"}
    recorded = []
    for stage in recipe.stages:
        commands = [check.substitute(c, variables) for c in stage.commands]
        recorded += commands
        # Each stage is a make target whose own recipe lines end its dry run, in the recorded order.
        assert make_commands(path.parent, stage.name, variables)[-len(commands):] == commands
    assert make_commands(path.parent, "all", variables) == recorded


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_nq_dry_run_commands_parse_as_ragkit_commands():
    """Every ragkit line of `make -n all` names an existing (sub)command and parses with its flags."""
    import typer.main

    from ragkit.cli import app

    out = subprocess.run(["make", "-n", "-s", "-C", str(PIPELINES / "nq"), "all", "RAGKIT=RAGKIT", "DATA=/data",
                          "WORK=/work-dir"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("RAGKIT ")]
    root = typer.main.get_command(app)
    parsed = []
    for line in lines:
        args = shlex.split(line)[1:]
        command, path = root, []
        while hasattr(command, "commands"):  # a group (typer carries its own copy of click)
            name = args[0] if args and args[0] in command.commands else "build"  # `ragkit index X` builds
            assert name in command.commands, f"{line}: no command {' '.join(path + [args[0]])}"
            command, path = command.commands[name], path + [name]
            args = args[1:] if args and args[0] == name else args
        try:
            command.make_context(" ".join(path), list(args))
        except Exception as exc:  # click's UsageError: an unknown flag, a bad value, a missing argument
            raise AssertionError(f"{line}: {getattr(exc, 'format_message', exc.__str__)()}") from None
        parsed.append(" ".join(path))
    assert parsed == ["ingest", "mine", "evaluate", "train retriever", "index build", "evaluate", "train reader", "answer",
                      "train reader", "answer"]
    assert "--batch-size 128 --chunk-size 32" in lines[3] and "--device cuda" in lines[3]


@pytest.mark.slow
@pytest.mark.skipif(not (DATASETS / "scifact" / "corpus.jsonl").is_file() or shutil.which("make") is None,
                    reason="needs the shared SciFact data and GNU make")
def test_scifact_bm25_recipe_reproduces(tmp_path, capsys):
    ragkit = Path(sys.executable).parent / "ragkit"
    subprocess.run(["make", "-s", "-C", str(PIPELINES / "scifact"), "bm25", f"RAGKIT={ragkit}", f"DATA={DATASETS}",
                    f"WORK={tmp_path}"], check=True, capture_output=True)
    code = check.main([str(PIPELINES / "scifact" / "expected.toml"), "--work", str(tmp_path),
                       "--stage", "ingest", "--stage", "bm25"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 FAIL, 0 MISSING" in out
