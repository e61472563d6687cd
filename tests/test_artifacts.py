import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ragkit
from ragkit import artifacts
from ragkit.artifacts import (
    SCHEMA_VERSION,
    Manifest,
    artifact_input,
    file_input,
    hash_path,
    read_upstream,
    remove_stale_staging,
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


# --- leftovers of killed runs ------------------------------------------------------------------------

needs_flock = pytest.mark.skipif(artifacts.fcntl is None, reason="no flock on this platform")

HOLD_STAGING = """
import sys
from ragkit.artifacts import staged_output

with staged_output(sys.argv[1]) as tmp:
    (tmp / "part.txt").write_text("half")
    print(tmp, flush=True)
    sys.stdin.read()
"""


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


@needs_flock
def test_only_leftovers_of_dead_runs_are_removed(tmp_path, caplog):
    # Run 0badc0de died before it wrote a lock (or came from a ragkit without locks): nothing owns it.
    (tmp_path / ".a.tmp-0badc0de").mkdir()
    (tmp_path / ".a.tmp-0badc0de" / "half.bin").write_bytes(b"x" * 10)
    # Run 12345678 was killed during its final rename: both directories, and a lock nobody holds.
    (tmp_path / ".a.tmp-12345678").mkdir()
    (tmp_path / ".a.old-12345678").mkdir()
    (tmp_path / ".a.lock-12345678").write_text(json.dumps({"pid": 4242, "host": "box"}))
    (tmp_path / ".a.lock-9abcdef0").write_text("")  # a lock whose run died before making its directory
    kept = ["a", ".a.work", ".a.tmp-notanid", ".b.tmp-12345678", ".a.b.tmp-12345678", ".a.tmp-87654321"]
    for name in kept[:-1]:
        (tmp_path / name).mkdir()
    (tmp_path / kept[-1]).write_text("a file, not a staging directory")
    with caplog.at_level(logging.WARNING, logger="ragkit.artifacts"):
        removed = remove_stale_staging(tmp_path / "a")
    assert sorted(p.name for p in removed) == [".a.old-12345678", ".a.tmp-0badc0de", ".a.tmp-12345678"]
    assert _names(tmp_path) == sorted(kept)
    assert len(caplog.records) == 1 and "4242 on box" in caplog.records[0].getMessage()
    caplog.clear()
    assert remove_stale_staging(tmp_path / "a") == [] and not caplog.records


@needs_flock
def test_a_concurrent_run_into_the_same_output_keeps_the_live_staging_dir(tmp_path):
    out = tmp_path / "a"
    with staged_output(out) as outer:
        (outer / "data.txt").write_text("outer")
        assert remove_stale_staging(out) == []
        with staged_output(out) as inner:  # cleans up first: the outer run holds its lock, so it stays
            assert outer.is_dir() and inner != outer
            Manifest(stage="mine").save(inner)
        assert (outer / "data.txt").read_text() == "outer"
        assert Manifest.load(out).stage == "mine"
        Manifest(stage="ingest").save(outer)
    assert Manifest.load(out).stage == "ingest" and (out / "data.txt").read_text() == "outer"
    assert _names(tmp_path) == ["a"]


@needs_flock
def test_staging_dir_of_a_killed_process_is_removed_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "a"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ragkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        staging = Path(holder.stdout.readline().strip())
        assert staging.parent == tmp_path and (staging / "part.txt").is_file()
        assert remove_stale_staging(out) == []  # another process holds its lock: alive
        assert staging.is_dir()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stdin.close()
    assert staging.is_dir()  # kill -9: nothing ran to remove it
    with caplog.at_level(logging.WARNING, logger="ragkit.artifacts"):
        with staged_output(out) as tmp:
            Manifest(stage="ingest").save(tmp)
    assert _names(tmp_path) == ["a"]
    assert [r.getMessage().count(staging.name) for r in caplog.records] == [1]
    assert f"pid {holder.pid} on " in caplog.records[0].getMessage()
