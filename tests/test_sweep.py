"""`ragkit sweep`: runs in their own directories, resumable, the winner chosen on validation only."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from test_trainer import corpus, write_tiny_model
from typer.testing import CliRunner

from ragkit import sweep
from ragkit.cli import app
from ragkit.errors import RagkitError


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """The trainer tests' corpus with a third of its training questions as validation, ingested and mined."""
    root = tmp_path_factory.mktemp("sweep")
    passages, train, dev = corpus()
    splits = {"train": [q for i, q in enumerate(train) if i % 3], "validation": train[::3], "dev": dev}
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for p in passages:
            handle.write(json.dumps({k: p[k] for k in ("id", "title", "text")}) + "\n")
    for split, rows in splits.items():
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for q in rows:
                handle.write(json.dumps({k: q[k] for k in ("id", "question", "answers", "positive_ids")}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(root / "corpus.jsonl"), *(f"{s}={root / s}.jsonl" for s in splits),
                                 "--out", str(root / "ingest")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["mine", str(root / "ingest"), "--out", str(root / "mine"), "--negatives", "4",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    write_tiny_model(root / "tiny")
    return root


def write_spec(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_sweep(root: Path, out: str) -> Path:
    return write_spec(root, out, f"""
mine = "{root / 'mine'}"
out = "{root / out}"
select = "accuracy@5"
threads = 1

[train]
model = "{root / 'tiny'}"
batch_size = 4
hard_negatives = 1
max_steps = 2
query_max_length = 16
passage_max_length = 24
eval_batch_size = 8
device = "cpu"

[grid]
lr = [1e-5, 5e-3]
""")


def rewrite(result_path: Path, validation: float, dev: float, metric: str) -> None:
    result = json.loads(result_path.read_text())
    result["validation"][metric], result["dev"][metric] = validation, dev
    result_path.write_text(json.dumps(result))


def test_a_sweep_of_two_runs_writes_its_table_and_picks_the_winner_on_validation_not_dev(mined, monkeypatch):
    spec = sweep.load_spec(tiny_sweep(mined, "two"))
    best = sweep.run(spec)
    out = mined / "two"
    names = ["lr=1e-05_seed=0", "lr=0.005_seed=0"]
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        assert (out / name / "retriever" / "manifest.json").is_file()
        # Validation is what training recorded; dev is the evaluate stage's score of the dev split's search.
        trained = json.loads((out / name / "retriever" / "manifest.json").read_text())["metrics"]
        assert trained["eval_split"] == "validation" and result["validation"] == trained["validation"]
        scored = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert result["dev"] == scored["trained"]["dev"] and result["hybrid_dev"] == scored["hybrid"]["dev"]
        assert isinstance(result["hybrid_alpha"], float)
        assert result["dev"]["questions"] == len(corpus()[2])
    with open(out / "sweep.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["lr"] for row in rows] == ["1e-05", "0.005"]
    assert (out / "sweep.png").stat().st_size > 0
    assert best["name"] in {"lr=1e-05", "lr=0.005"}

    # Make validation and dev disagree: the low rate wins on validation, the high one on dev.
    rewrite(out / names[0] / "result.json", validation=0.9, dev=0.1, metric="accuracy@5")
    rewrite(out / names[1] / "result.json", validation=0.2, dev=0.8, metric="accuracy@5")

    def no_training(cfg):
        raise AssertionError(f"{cfg.out} was trained again although its result exists")

    monkeypatch.setattr("ragkit.retriever.trainer.run", no_training)
    monkeypatch.setattr("ragkit.indexing.stage.run", no_training)
    best = sweep.run(spec)
    assert best["name"] == "lr=1e-05"
    table = (out / "sweep.md").read_text()
    assert "Winner on validation accuracy@5: `lr=1e-05`" in table
    winner_line = next(line for line in table.splitlines() if "(winner)" in line)
    assert winner_line.startswith("| lr=1e-05 |") and "0.900" in winner_line and "0.100" in winner_line
    assert "| BM25 |" in table and "hybrid-dev accuracy@5" in table
    assert json.loads((out / "sweep.json").read_text())["winner"] == "lr=1e-05"


def test_an_interrupted_run_is_retrained_and_a_changed_setting_is_refused(mined):
    spec_path = tiny_sweep(mined, "resume")
    spec = sweep.load_spec(spec_path)
    sweep.run(spec)
    folder = mined / "resume" / "lr=0.005_seed=0"
    (folder / "result.json").unlink()
    (folder / "timing.json").unlink()  # training never finished writing its time
    before = (folder / "retriever" / "manifest.json").stat().st_mtime_ns
    sweep.run(spec)
    assert (folder / "retriever" / "manifest.json").stat().st_mtime_ns != before
    assert (folder / "result.json").is_file()
    spec_path.write_text(spec_path.read_text().replace("max_steps = 2", "max_steps = 3"))
    with pytest.raises(RagkitError, match="result.json: was trained with other settings"):
        sweep.run(sweep.load_spec(spec_path))


def test_mean_and_standard_deviation_over_seeds_and_per_run_seeds(tmp_path):
    spec = sweep.SweepSpec(mine="m", out=str(tmp_path), train={"max_steps": 1}, seeds=[0],
                           runs=[{"lr": 1e-4, "seeds": [0, 1, 2]}, {"lr": 5e-5}], select="ndcg@10")
    assert spec.plan() == [({"lr": 1e-4}, [0, 1, 2]), ({"lr": 5e-5}, [0])]
    rng = np.random.default_rng(0)
    results = []
    for setting, seeds in spec.plan():
        for seed in seeds:
            metrics = {split: {"ndcg@10": float(rng.random()), "accuracy@20": float(rng.random())}
                       for split in ("validation", "dev")}
            results.append({"setting": setting, "seed": seed, "select_metric": "accuracy@20",
                            "train_seconds": float(rng.integers(60, 600)), **metrics})
    rows = sweep.summarise(spec, results)
    three = [r for r in results if r["setting"] == {"lr": 1e-4}]
    expected = [r["validation"]["ndcg@10"] for r in three]
    assert rows[0]["seeds"] == 3 and rows[1]["seeds"] == 1
    assert rows[0]["validation ndcg@10"] == pytest.approx((np.mean(expected), np.std(expected, ddof=1)))
    assert rows[0]["dev accuracy@20"][0] == pytest.approx(statistics.fmean(r["dev"]["accuracy@20"] for r in three))
    assert rows[1]["validation ndcg@10"][1] == 0.0
    assert rows[0]["train min"][0] == pytest.approx(np.mean([r["train_seconds"] for r in three]) / 60)


def test_settings_are_compared_on_the_seeds_they_share(tmp_path):
    """Setting A ran seeds 0-2 (mean 0.60, pulled up by lucky seeds 1 and 2), setting B seed 0 only: on
    the shared seed 0, B is better, so B wins although A's mean over its own seeds is higher."""
    spec = sweep.SweepSpec(mine="m", out=str(tmp_path), train={"max_steps": 1}, seeds=[0],
                           runs=[{"lr": 1e-4, "seeds": [0, 1, 2]}, {"lr": 5e-5}], select="ndcg@10")
    scores = {(1e-4, 0): 0.40, (1e-4, 1): 0.70, (1e-4, 2): 0.70, (5e-5, 0): 0.50}
    results = [{"setting": setting, "seed": seed, "select_metric": "ndcg@10", "train_seconds": 60.0,
                "validation": {"ndcg@10": scores[setting["lr"], seed], "accuracy@20": 0.5},
                "dev": {"ndcg@10": 0.9 if setting["lr"] == 1e-4 else 0.1, "accuracy@20": 0.5}}
               for setting, seeds in spec.plan() for seed in seeds]
    rows = sweep.summarise(spec, results)
    assert rows[0]["validation ndcg@10"][0] > rows[1]["validation ndcg@10"][0]
    assert sweep.shared_seeds(rows) == [0]
    best = sweep.winner(rows, "ndcg@10")
    assert best["name"] == "lr=5e-05"
    table = sweep.markdown(rows, best, "ndcg@10", {})
    assert "compared on the seed every setting ran: 0" in table
    # Without a shared seed each setting is judged on its own seeds.
    assert sweep.winner([rows[0], {**rows[1], "per_seed": {5: 0.50}}], "ndcg@10")["name"] == "lr=0.0001"


def test_a_run_is_the_same_run_whatever_path_names_its_mine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = sweep.comparable({"mine": "work/../work/mine", "out": "a", "lr": 1e-4, "resume": True})
    absolute = sweep.comparable({"mine": str(tmp_path / "work" / "mine"), "out": "b", "lr": 1e-4})
    assert relative == absolute == {"mine": str((tmp_path / "work" / "mine").resolve()), "lr": 1e-4}
    assert sweep.comparable({"mine": str(tmp_path / "other"), "lr": 1e-4}) != absolute


def test_two_shards_share_a_sweep_and_the_report_covers_both(mined, monkeypatch):
    spec = sweep.load_spec(tiny_sweep(mined, "shards"))
    out = mined / "shards"
    trained = []
    from ragkit.retriever.trainer import run as real_train

    def counting(cfg, *args, **kwargs):
        trained.append(Path(cfg.out).parent.name)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr("ragkit.retriever.trainer.run", counting)
    with pytest.raises(RagkitError, match="no run has finished yet"):
        sweep.run(spec, train=False)
    sweep.run(spec, shard=(1, 2))
    assert trained == ["lr=0.005_seed=0"]
    table = (out / "sweep.md").read_text()
    assert "Not finished yet (1 of 2 runs): lr=1e-05_seed=0" in table
    sweep.run(spec, shard=(0, 2))
    assert trained == ["lr=0.005_seed=0", "lr=1e-05_seed=0"]
    sweep.run(spec, train=False)
    assert trained == ["lr=0.005_seed=0", "lr=1e-05_seed=0"]  # the report trains nothing
    table = (out / "sweep.md").read_text()
    assert "Not finished" not in table and table.count("_seed=") == 0 and "| lr=0.005 |" in table and "| lr=1e-05 |" in table
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(RagkitError, match="is not I/N"):
            sweep.parse_shard(bad)
    assert sweep.parse_shard("1/3") == (1, 3)


def test_bad_sweep_files_fail_with_one_line_naming_the_file(mined, tmp_path):
    cases = {
        "unknown setting": ("[grid]\nlearning_rate = [1e-4]\n", "has 'learning_rate', not a train retriever setting"),
        "seed in grid": ("[grid]\nseed = [0, 1]\n", "set seeds at top level"),
        "empty list": ("[grid]\nlr = []\n", "lr must be a non-empty list"),
        "bad value": ("[grid]\nlr = [-1.0]\n", "lr"),
        "repeated seeds": ("seeds = [1, 1]\n", "repeats a seed"),
        "same run twice": ("[[runs]]\nlr = 1e-4\n[[runs]]\nlr = 1e-4\n", "same settings"),
    }
    for name, (body, message) in cases.items():
        path = write_spec(tmp_path, name.replace(" ", "_"), f'mine = "{mined / "mine"}"\nout = "{tmp_path / "o"}"\n{body}')
        with pytest.raises(RagkitError, match=message) as caught:
            sweep.load_spec(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value), name
    path = write_spec(tmp_path, "no_mine", f'out = "{tmp_path / "o"}"\n')
    with pytest.raises(RagkitError, match="no 'mine' given"):
        sweep.load_spec(path)


def test_a_mine_without_validation_questions_is_refused_before_training(tmp_path):
    passages, train, dev = corpus()
    keys = {"corpus": ("id", "title", "text"), "train": ("id", "question", "answers", "positive_ids")}
    for split, rows in (("corpus", passages), ("train", train), ("dev", dev)):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({k: row[k] for k in keys.get(split, keys["train"])}) + "\n")
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "corpus.jsonl"), f"train={tmp_path / 'train.jsonl'}",
                               f"dev={tmp_path / 'dev.jsonl'}", "--out", str(tmp_path / "ingest")]).exit_code == 0
    assert runner.invoke(app, ["mine", str(tmp_path / "ingest"), "--out", str(tmp_path / "mine"), "--workers", "1"]).exit_code == 0
    path = write_spec(tmp_path, "s", f'mine = "{tmp_path / "mine"}"\nout = "{tmp_path / "o"}"\n')
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "has no validation questions" in result.output and "--validation-fraction" in result.output
    assert not (tmp_path / "o").exists()
