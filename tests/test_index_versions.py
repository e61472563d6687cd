"""Index versions: updates equal a fresh build, failures leave nothing behind, rollback is exact, bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragkit.config import IndexConfig, IndexUpdateConfig
from ragkit.errors import RagkitError
from ragkit.indexing import versions as versions_module
from ragkit.indexing.search import DenseSearcher
from ragkit.indexing.stage import run
from ragkit.indexing.versions import IndexVersion, VersionPassages, current_version, list_versions, rollback, update

from indexing_data import corpus, write_ingest, write_tiny_model

ADDED = [{"id": "n1", "title": "title14", "text": "w14x0 w14x1 ans14 c1"},
         {"id": "n2", "title": "title15", "text": "w15x2 w15x3 c2 c3 c4"},
         {"id": "n3", "title": "", "text": "w16x0 which"}]
REPLACED = [{"id": "p0-1", "title": "title0", "text": "changed w0x5 c7"},
            {"id": "p5-2", "title": "new", "text": "w5x1 w5x2 w5x3 ans5"}]
DELETED = ["p1-0", "p2-2", "p7-1"]
SECOND_ADD = [{"id": "p1-0", "title": "title1", "text": "w1x0 w1x4 ans1 new"}]  # a deleted id comes back
SECOND_REPLACE = [{"id": "n2", "title": "title15", "text": "w15x0 changed"}]
SECOND_DELETE = ["n3", "p4-1"]
QUERIES = [q["question"] for split in corpus()[1].values() for q in split] + ["which w14x0", "w15x0 changed"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_ids(path: Path, ids: list[str]) -> str:
    path.write_text("".join(f"{pid}\n" for pid in ids), encoding="utf-8")
    return str(path)


def apply(passages: list[dict], add: list[dict], replace: list[dict], delete: list[str]) -> list[dict]:
    """The corpus after an update, computed directly."""
    changed = {row["id"]: row for row in replace}
    kept = [{**p, **changed.get(p["id"], {})} for p in passages if p["id"] not in delete]
    return kept + [{**row, "doc_id": row["id"]} for row in add]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {"root": root, "ingest": write_ingest(root), "model": write_tiny_model(root / "tiny"),
            "other": write_tiny_model(root / "other", seed=1), "wide": write_tiny_model(root / "wide", hidden=48)}


def build(data, out: Path, ingest: Path | None = None, **overrides) -> Path:
    settings = dict(ingest=str(ingest or data["ingest"]), out=str(out), model=str(data["model"]), precision="fp32",
                    device="cpu", batch_size=8, splits=[])
    settings.update(overrides)
    run(IndexConfig(**settings))
    return out


def update_config(index: Path, **files) -> IndexUpdateConfig:
    return IndexUpdateConfig(index=str(index), precision="fp32", device="cpu", batch_size=3, **files)


def results(index: Path, k: int = 12) -> list[tuple[list[str], list[float]]]:
    return [(hits.passage_ids, hits.scores) for hits in DenseSearcher.open(index, device="cpu", precision="fp32").search(QUERIES, k)]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF2,Flat"])
def test_updates_then_search_equal_a_fresh_build_of_the_resulting_corpus(data, tmp_path, factory, caplog):
    index = build(data, tmp_path / "index", factory=factory)
    files = {"add": write_jsonl(tmp_path / "add.jsonl", ADDED), "replace": write_jsonl(tmp_path / "replace.jsonl", REPLACED),
             "delete": write_ids(tmp_path / "delete.txt", DELETED)}
    with caplog.at_level(logging.WARNING, logger="ragkit.index"):
        second = update(update_config(index, **files))
    assert second.name == "v0002" and current_version(index) == "v0002" and second.parent == "v0001"
    assert second.info["rebuilt"] == (factory == "HNSW8")
    assert ("rebuilding it from the 37 kept embeddings" in caplog.text) == (factory == "HNSW8")
    assert second.info["counts"] == {"passages": 42, "rows": 47, "added": 3, "replaced": 2, "deleted": 3}
    files = {"add": write_jsonl(tmp_path / "add2.jsonl", SECOND_ADD),
             "replace": write_jsonl(tmp_path / "replace2.jsonl", SECOND_REPLACE),
             "delete": write_ids(tmp_path / "delete2.txt", SECOND_DELETE)}
    third = update(update_config(index, **files))
    assert third.name == "v0003" and third.info["counts"]["passages"] == 41

    passages = apply(apply(corpus()[0], ADDED, REPLACED, DELETED), SECOND_ADD, SECOND_REPLACE, SECOND_DELETE)
    fresh = build(data, tmp_path / "fresh", ingest=write_ingest(tmp_path, passages, name="fresh-ingest"))
    for (ids, scores), (fresh_ids, fresh_scores) in zip(results(index), results(fresh), strict=True):
        assert ids == fresh_ids
        np.testing.assert_allclose(scores, fresh_scores, rtol=1e-5, atol=1e-5)

    # Unchanged vectors were not re-encoded or copied: v0001's segment is the same file in every version.
    first_segment = index / "versions" / "v0001" / "segments" / "0000" / "embeddings.npy"
    assert (third.path / "segments" / "0000" / "embeddings.npy").stat().st_ino == first_segment.stat().st_ino
    assert len(third.info["segments"]) == 3

    text = VersionPassages(third, data["ingest"])
    assert text.get("n2")["text"] == "w15x0 changed" and text.get("p0-1")["text"] == "changed w0x5 c7"
    assert text.get("p1-0")["text"] == "w1x0 w1x4 ans1 new" and text.get("p3-0")["text"] == corpus()[0][9]["text"]
    for gone in ("n3", "p2-2"):
        with pytest.raises(RagkitError, match="was deleted"):
            text.get(gone)


def test_rollback_restores_the_previous_results_exactly(data, tmp_path):
    index = build(data, tmp_path / "index")
    before = results(index)
    update(update_config(index, add=write_jsonl(tmp_path / "add.jsonl", ADDED), delete=write_ids(tmp_path / "d.txt", DELETED)))
    assert results(index) != before
    assert rollback(index).name == "v0001" and current_version(index) == "v0001"
    assert results(index) == before  # the same index file: bit for bit
    with pytest.raises(RagkitError, match="v0001 is the first version, there is nothing to roll back to"):
        rollback(index)
    assert rollback(index, "v0002").name == "v0002"
    with pytest.raises(RagkitError, match=r"has no version 'v0009' \(versions: v0001, v0002\)"):
        rollback(index, "v0009")
    rollback(index, "v0001")
    branch = update(update_config(index, delete=write_ids(tmp_path / "d2.txt", ["p0-0"])))
    assert branch.name == "v0003" and branch.parent == "v0001"  # numbers never repeat


@pytest.mark.parametrize("where", ["save", "set_current"])
def test_an_update_killed_midway_leaves_the_old_version_current_and_no_garbage(data, tmp_path, monkeypatch, where):
    index = build(data, tmp_path / "index")
    before, files_before = results(index), snapshot(index)

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt

    target = versions_module.FaissIndex if where == "save" else versions_module
    monkeypatch.setattr(target, where, power_cut)
    with pytest.raises(KeyboardInterrupt):
        update(update_config(index, add=write_jsonl(tmp_path / "add.jsonl", ADDED), delete=write_ids(tmp_path / "d.txt", DELETED)))
    monkeypatch.undo()
    assert current_version(index) == "v0001" and list_versions(index) == ["v0001"]
    assert snapshot(index) == files_before and sorted(p.name for p in (index / "versions").iterdir()) == ["v0001"]
    assert results(index) == before


def test_bad_updates_are_one_line_errors_that_change_nothing(data, tmp_path):
    index = build(data, tmp_path / "index")
    files_before = snapshot(index)
    cases = [
        ({"add": write_jsonl(tmp_path / "dup.jsonl", [ADDED[0], ADDED[1], ADDED[0]])},
         r"dup.jsonl:3: passage 'n1' is listed again \(first at .*dup.jsonl:1\)"),
        ({"replace": write_jsonl(tmp_path / "r.jsonl", REPLACED), "delete": write_ids(tmp_path / "d.txt", ["p0-1"])},
         r"d.txt:1: passage 'p0-1' is listed again \(first at .*r.jsonl:1\)"),
        ({"replace": write_jsonl(tmp_path / "unknown.jsonl", [{"id": "zz", "text": "x"}])},
         r"unknown.jsonl:1: passage 'zz' is not in the index \(use --add"),
        ({"delete": write_ids(tmp_path / "unknown.txt", ["p0-0", "", "nope"])}, r"unknown.txt:3: passage 'nope' is not in the index"),
        ({"add": write_jsonl(tmp_path / "exists.jsonl", [ADDED[0], {"id": "p3-1", "text": "x"}])},
         r"exists.jsonl:2: passage 'p3-1' is already in the index \(use --replace"),
        ({"add": write_jsonl(tmp_path / "notext.jsonl", [{"id": "n9", "title": "t"}])}, r"notext.jsonl:1: missing or empty string field 'text'"),
        ({"add": str(tmp_path / "missing.jsonl")}, r"missing.jsonl: no such file \(check the --add path\)"),
        ({}, r"nothing to update"),
        ({"add": write_jsonl(tmp_path / "a.jsonl", ADDED), "model": str(data["other"])},
         r"was built by another encoder .* \(passage_fingerprint differs\); use the model that built its passages"),
        ({"delete": write_ids(tmp_path / "d2.txt", ["p0-0"]), "model": str(data["wide"])},
         r"holds 32-dimensional vectors, the model .*wide makes 48"),
    ]
    for files, message in cases:
        with pytest.raises(RagkitError, match=message) as error:
            update(update_config(index, **files))
        assert "\n" not in str(error.value)
        assert snapshot(index) == files_before, message
    with pytest.raises(RagkitError, match=r"was built by another encoder .*\(query_fingerprint differs\)"):
        DenseSearcher.open(index, model=str(data["other"]), device="cpu")
    with pytest.raises(RagkitError, match=r"holds 32-dimensional vectors, the model .*wide makes 48"):
        DenseSearcher.open(index, model=str(data["wide"]), device="cpu")


def test_a_version_left_half_written_by_a_killed_process_is_discarded(data, tmp_path):
    index = build(data, tmp_path / "index")
    stale = index / "versions" / ".v0002.tmp-deadbeef"
    shutil.copytree(index / "versions" / "v0001", stale)
    assert list_versions(index) == ["v0001"]  # never a version
    version = update(update_config(index, delete=write_ids(tmp_path / "d.txt", ["p0-0"])))
    assert version.name == "v0002" and not stale.exists()
    assert IndexVersion.open(index, "v0001").info["counts"]["passages"] == 42
