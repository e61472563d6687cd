import json

import pytest

from ragkit.artifacts import (
    SCHEMA_VERSION,
    Manifest,
    artifact_input,
    file_input,
    hash_path,
    read_upstream,
    staged_output,
    write_json_atomic,
)
from ragkit.errors import RagkitError


def _make(out, stage="ingest", **kwargs):
    with staged_output(out) as tmp:
        (tmp / "data.txt").write_text("payload")
        manifest = Manifest(stage=stage, **kwargs)
        manifest.save(tmp)
    manifest.path = out
    return manifest


def test_staged_output_renames_into_place(tmp_path):
    out = tmp_path / "a"
    _make(out, counts={"passages": 3})
    assert (out / "data.txt").read_text() == "payload"
    loaded = Manifest.load(out)
    assert loaded.stage == "ingest" and loaded.counts == {"passages": 3} and loaded.schema == SCHEMA_VERSION
    assert loaded.versions["ragkit"] and loaded.created and isinstance(loaded.command, list)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp leftovers


def test_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(RuntimeError):
        with staged_output(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "a"
    _make(out)
    with pytest.raises(RagkitError, match="--overwrite"):
        _make(out)
    with staged_output(out, overwrite=True) as tmp:
        Manifest(stage="mine").save(tmp)
    assert Manifest.load(out).stage == "mine"
    assert not (out / "data.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_read_upstream_refuses_wrong_stage_and_schema(tmp_path):
    out = tmp_path / "a"
    _make(out, stage="mine")
    with pytest.raises(RagkitError, match="written by stage 'mine'") as info:
        read_upstream(out, "ingest")
    assert "\n" not in str(info.value)
    data = json.loads((out / "manifest.json").read_text())
    data["schema"] = SCHEMA_VERSION + 1
    write_json_atomic(out / "manifest.json", data)
    with pytest.raises(RagkitError, match="schema"):
        read_upstream(out, "mine")
    with pytest.raises(RagkitError, match="no such artifact"):
        read_upstream(tmp_path / "missing", "mine")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RagkitError, match="not a ragkit artifact"):
        read_upstream(tmp_path / "plain", "mine")


def test_rebuilt_upstream_is_detected(tmp_path):
    up = tmp_path / "up"
    _make(up, stage="ingest")
    down = tmp_path / "down"
    _make(down, stage="mine", inputs=[artifact_input(up)])
    assert read_upstream(down, "mine").upstream("ingest") == up.resolve()
    with staged_output(up, overwrite=True) as tmp:  # rebuild upstream
        Manifest(stage="ingest", counts={"passages": 99}).save(tmp)
    with pytest.raises(RagkitError, match="rebuilt after"):
        read_upstream(down, "mine")


def test_hashes_follow_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    before = hash_path(tmp_path / "d")
    assert file_input(tmp_path / "d", "corpus")["sha256"] == before
    (tmp_path / "d" / "x").write_text("2")
    assert hash_path(tmp_path / "d") != before
