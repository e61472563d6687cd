"""The RAG reader over a real index: its loss against a naive loop, where the gradient goes, training with
exact resumption, answering from the CLI, and refused inputs. Tiny models built from a config, CPU."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from indexing_data import brute_force, build_indexed, corpus, invoke, direct_passage_vectors, direct_query_vectors, write_tiny_model
from tiny_generators import one_thread, tiny_bart, tiny_llama  # noqa: F401  (one_thread: autouse fixture)
from ragkit.answers import exact_match, f1
from ragkit.artifacts import hash_file
from ragkit.cli import app
from ragkit.errors import RagkitError
from ragkit.reader.config import TrainReaderConfig
from ragkit.reader.generator import load_generator
from ragkit.reader.rag import RagReader
from ragkit.reader.train import ReaderTrainState, ReaderTrainer, run

runner = CliRunner()
TEMPERATURE = 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    data = build_indexed(tmp_path_factory.mktemp("rag"))
    tiny_llama(data["root"] / "llama")
    tiny_bart(data["root"] / "bart")
    return {**data, "llama": data["root"] / "llama", "bart": data["root"] / "bart"}


def train_questions() -> list[dict]:
    return corpus()[1]["train"]


@pytest.mark.parametrize("generator", ["llama", "bart"])
@pytest.mark.parametrize("marginal", ["sequence", "token"])
def test_loss_equals_a_naive_loop_over_passages_and_tokens(data, generator, marginal):
    reader = RagReader.load(str(data[generator]), index=data["index"], device="cpu", precision="fp32", marginal=marginal,
                            temperature=TEMPERATURE)
    retriever = reader.retriever(data["index"], precision="fp32")
    questions = train_questions()[:3]
    texts, answers, k = [q["question"] for q in questions], [q["answers"][0] for q in questions], 3
    loss, _ = reader.loss(texts, answers, retriever, k)

    passages = corpus()[0]
    queries = direct_query_vectors(data["model"], texts)
    rows, scores = brute_force(queries, direct_passage_vectors(data["model"], passages), k)  # (B, K)
    naive = lowlevel = load_generator(str(data[generator]), 256)
    expected = 0.0
    torch.set_grad_enabled(False)
    for question, answer, question_rows, question_scores in zip(texts, answers, rows, scores):
        prior = torch.log_softmax(torch.tensor(question_scores, dtype=torch.float64) / TEMPERATURE, dim=0)  # (K,)
        per_passage = []
        for row in question_rows:
            inputs = naive.encode([question], [[passages[row]]])
            target = lowlevel.encode_answers([answer])
            per_passage.append(naive.target_log_probs(inputs, target)[0, target.mask[0]].double())  # (T,)
        token_log_probs = torch.stack(per_passage)  # (K, T)
        if marginal == "sequence":
            expected -= float(torch.logsumexp(prior + token_log_probs.sum(1), dim=0))
        else:
            expected -= float(torch.logsumexp(prior[:, None] + token_log_probs, dim=0).sum())
    torch.set_grad_enabled(True)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_gradient_reaches_the_query_tower_not_the_index_and_a_frozen_tower_gets_none(data):
    reader = RagReader.load(str(data["llama"]), index=data["index"], device="cpu", precision="fp32", temperature=TEMPERATURE)
    retriever = reader.retriever(data["index"], precision="fp32")
    before = retriever.passage_vectors(np.arange(len(retriever))).copy()
    questions = train_questions()[:2]
    loss, _ = reader.loss([q["question"] for q in questions], [q["answers"][0] for q in questions], retriever, 3)
    loss.backward()
    grads = [p.grad for p in reader.encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is not None for p in reader.generator.model.parameters() if p.requires_grad and p.dim() > 1)
    np.testing.assert_array_equal(retriever.passage_vectors(np.arange(len(retriever))), before)

    frozen = RagReader.load(str(data["llama"]), index=data["index"], device="cpu", precision="fp32")
    frozen.encoder.requires_grad_(False)
    loss, _ = frozen.loss([q["question"] for q in questions], [q["answers"][0] for q in questions], retriever, 3)
    loss.backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())


def train_config(data, out: Path, **overrides) -> TrainReaderConfig:
    settings = dict(index=str(data["index"]), out=str(out), generator=str(data["llama"]), n_docs=3, batch_size=2, max_steps=4,
                    lr=1e-3, warmup=1, eval_max_questions=3, precision="fp32", device="cpu", max_input_length=64,
                    max_new_tokens=4, temperature=TEMPERATURE)
    return TrainReaderConfig(**{**settings, **overrides})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {**{f"g.{k}": v for k, v in load_file(directory / "generator" / "model.safetensors").items()},
            **{f"q.{k}": v for k, v in load_file(directory / "query_encoder" / "model.safetensors").items()}}


def test_training_resumes_exactly_and_never_touches_the_index(data, tmp_path):
    index_files = {p: hash_file(p) for p in sorted(data["index"].rglob("*")) if p.is_file()}
    straight = run(train_config(data, tmp_path / "straight", eval_split="dev"))

    class Crash(Exception):
        pass

    def crash_at_3(step: int) -> None:
        if step == 3:
            raise Crash

    interrupted = train_config(data, tmp_path / "resumed", eval_split="dev", checkpoint_every=2)
    with pytest.raises(Crash):
        run(interrupted, on_step=crash_at_3)
    assert not (tmp_path / "resumed").exists()
    resumed = run(train_config(data, tmp_path / "resumed", eval_split="dev", checkpoint_every=2, resume=True))
    assert resumed.counts["steps"] == straight.counts["steps"] == 4
    # Both keep the best evaluation's weights; force the comparison onto the final ones via the log.
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in log_a] == [r.get("loss") for r in log_b]
    assert {p: hash_file(p) for p in sorted(data["index"].rglob("*")) if p.is_file()} == index_files


def test_a_frozen_query_tower_is_saved_unchanged_and_a_trained_one_changes(data, tmp_path):
    run(train_config(data, tmp_path / "frozen", freeze_query_encoder=True, eval_every=0, max_steps=2))
    run(train_config(data, tmp_path / "free", max_steps=2, eval_max_questions=0, eval_split="train"))
    original = load_file(data["model"] / "model.safetensors")
    frozen = load_file(tmp_path / "frozen" / "query_encoder" / "model.safetensors")
    free = load_file(tmp_path / "free" / "query_encoder" / "model.safetensors")
    assert all(torch.equal(original[k], frozen[k]) for k in original)
    assert any(not torch.equal(original[k], free[k]) for k in original)


def test_a_recall_collapse_is_warned_about_once(data):
    trainer = ReaderTrainer(train_config(data, data["root"] / "unused", recall_window=3))

    class Bar:
        lines: list[str] = []

        def write(self, line: str) -> None:
            self.lines.append(line)

    state, bar = ReaderTrainState(), Bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for recall in [1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0]:
            trainer._watch_recall(state, recall, bar)
    assert len(caught) == 1 and "retrieval recall fell from 0.93 to 0.40" in str(caught[0].message)
    assert len(bar.lines) == 1


def test_cli_trains_then_answers_one_question_a_split_and_closed_book(data, tmp_path):
    reader = tmp_path / "reader"
    result = invoke("train", "reader", data["index"], "--out", reader, "--generator", data["llama"], "--n-docs", 2,
                    "--batch-size", 2, "--max-steps", 2, "--eval-max-questions", 2, "--precision", "fp32", "--device", "cpu",
                    "--max-input-length", 64, "--marginal", "token")
    assert "train-reader" in result.output and "EM" in result.output
    question = corpus()[1]["dev"][0]["question"]
    result = invoke("answer", reader, question, "--index", data["index"], "--n-docs", 2, "--max-new-tokens", 3)
    assert result.output.startswith("answer:") and result.output.count("p(z|x)=") == 2
    out = tmp_path / "answers"
    result = invoke("answer", reader, "--index", data["index"], "--split", "dev", "--out", out, "--n-docs", 2,
                    "--decoding", "thorough", "--max-new-tokens", 3)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(records) == len(corpus()[1]["dev"]) and metrics["decoding"] == "thorough"
    metrics = metrics["dev"]
    assert metrics["em"] == pytest.approx(np.mean([exact_match(r["prediction"], r["answers"]) for r in records]), abs=1e-4)
    assert metrics["f1"] == pytest.approx(np.mean([f1(r["prediction"], r["answers"]) for r in records]), abs=1e-4)
    assert all(len(r["passages"]) == 2 for r in records)
    closed = tmp_path / "closed"
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": question, "answers": ["ans0"]}) + "\n")
    invoke("answer", data["llama"], "--questions", tmp_path / "questions.jsonl", "--n-docs", 0, "--out", closed,
           "--max-new-tokens", 3)
    record = json.loads((closed / "predictions.jsonl").read_text())
    assert record["passages"] == [] and record["answer_in_passages"] is None


def test_bad_inputs_are_refused_in_one_line(data, tmp_path):
    def refused(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1, result.output
        return result.output

    question = corpus()[1]["dev"][0]["question"]
    assert "neither a sequence-to-sequence nor a causal language model" in refused(
        "answer", data["model"], question, "--index", data["index"])
    assert "--n-docs 500 is more than the 42 passages of version v0001" in refused("answer", data["llama"], question, "--index", data["index"], "--n-docs", 500)
    assert "more than the 42 passages" in refused("train", "reader", data["index"], "--generator", data["llama"], "--n-docs", 50,
                                                 "--out", tmp_path / "r", "--device", "cpu")
    # A reader trained against one index refuses another index's passage tower.
    reader = tmp_path / "reader"
    run(train_config(data, reader, max_steps=1, eval_split="dev", eval_max_questions=1))
    other = write_tiny_model(tmp_path / "other", seed=3)
    invoke("index", "build", data["ingest"], "--model", other, "--out", tmp_path / "other-index", "--device", "cpu")
    assert "another passage encoder" in refused("answer", reader, question, "--index", tmp_path / "other-index")
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n{"answers": ["x"]}\n')
    assert "bad.jsonl:2: no \"question\" string" in refused("answer", data["llama"], "--questions", tmp_path / "bad.jsonl",
                                                           "--n-docs", 0, "--out", tmp_path / "o")
    with pytest.raises(RagkitError, match="needs --bm25"):
        train_config(data, tmp_path / "x", retrieval="bm25")


def test_python_functions_match_the_cli(data, tmp_path):
    import ragkit

    question = corpus()[1]["dev"][0]["question"]
    prediction = ragkit.answer(str(data["llama"]), question, index=str(data["index"]), n_docs=2, max_new_tokens=3,
                               precision="fp32")
    printed = invoke("answer", data["llama"], question, "--index", data["index"], "--n-docs", 2, "--max-new-tokens", 3,
                     "--precision", "fp32").output
    assert printed.splitlines()[0] == f"answer: {prediction.answer}" and len(prediction.passages) == 2
    manifest = ragkit.train_reader(str(data["index"]), str(tmp_path / "reader"), generator=str(data["llama"]), n_docs=2,
                                   batch_size=2, max_steps=1, eval_max_questions=1, precision="fp32", device="cpu",
                                   max_input_length=64)
    assert manifest.stage == "train-reader" and (tmp_path / "reader" / "reader.json").is_file()


def test_gradient_checkpointing_gives_the_same_training(data, tmp_path):
    plain = run(train_config(data, tmp_path / "plain", max_steps=2, eval_split="dev", eval_max_questions=1))
    saved = run(train_config(data, tmp_path / "saved", max_steps=2, eval_split="dev", eval_max_questions=1,
                             gradient_checkpointing=True))
    assert plain.counts["steps"] == saved.counts["steps"] == 2
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "saved")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
