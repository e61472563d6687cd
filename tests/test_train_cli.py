"""``ragkit train retriever`` end to end: raw jsonl -> ingest -> mine -> train, in one process and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ragkit.artifacts import Manifest
from ragkit.cli import app

SMALL = ["--batch-size", "4", "--hard-negatives", "2", "--device", "cpu", "--query-max-length", "16",
         "--passage-max-length", "24"]


def test_train_retriever_command_end_to_end(mined, tmp_path):
    (tmp_path / "train.toml").write_text('[train-retriever]\nlr = 5e-4\ntemperature = 0.1\nmax_steps = 99\n')
    out = tmp_path / "retriever"
    args = ["train", "retriever", str(mined / "mine"), "--out", str(out), "--model", str(mined / "tiny"), *SMALL,
            "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--chunk-size", "3",
            "--loss", "gte", "--config", str(tmp_path / "train.toml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and all(row in result.output for row in ("dev (bm25)", "dev (start)", "dev (trained)"))
    manifest = Manifest.load(out)
    assert manifest.config["lr"] == 5e-4 and manifest.config["temperature"] == 0.1  # from the TOML file
    assert manifest.config["max_steps"] == 4 and manifest.counts["steps"] == 4  # the flag wins over the file
    assert manifest.metrics["bm25_dev"] == Manifest.load(mined / "mine").metrics["dev"]
    assert json.loads((out / "retriever.json").read_text())["temperature"] == 0.1

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "pass --overwrite" in again.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp16"], "precision=fp16 needs a CUDA device"),
        (["--select-metric", "ndcg@11"], "select_metric='ndcg@11' is not one of"),
        (["--hard-negatives", "-1"], "hard_negatives=-1 must be >= 0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(mined, tmp_path, extra, message):
    result = CliRunner().invoke(app, ["train", "retriever", str(mined / "mine"), "--out", str(tmp_path / "r"),
                                      "--model", str(mined / "tiny"), *SMALL, *extra])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_an_ingest_artifact_is_refused_as_training_input(mined, tmp_path):
    result = CliRunner().invoke(app, ["train", "retriever", str(mined / "ingest"), "--out", str(tmp_path / "r"),
                                      "--model", str(mined / "tiny"), *SMALL])
    assert result.exit_code == 2 and "was written by stage 'ingest', this stage reads the output of stage 'mine'" in result.output


def test_two_processes_under_torchrun_train_the_single_process_weights(mined, tmp_path):
    """Two gloo processes, each with half the global batch and a gradient cache, gather representations
    and end with the weights of one process stepping on the whole batch without a cache (dropout off)."""
    common = [*SMALL, "--model", str(mined / "still"), "--max-steps", "2", "--lr", "1e-3", "--eval-every", "0"]
    single = CliRunner().invoke(app, ["train", "retriever", str(mined / "mine"), "--out", str(tmp_path / "one"), *common])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ragkit.cli", "train", "retriever", str(mined / "mine"), "--out", str(tmp_path / "two"),
               *common, "--chunk-size", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Manifest.load(tmp_path / "two").counts["processes"] == 2
    one, two = load_file(str(tmp_path / "one" / "query_encoder" / "model.safetensors")), load_file(str(tmp_path / "two" / "query_encoder" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4)
