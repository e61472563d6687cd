"""The retriever training stage: data rotation and sharding, the training loop, checkpoints and resume.

Everything runs on a tiny BERT built from a config and a hand-written ingest + mine artifact of a few
dozen passages, on CPU with fixed seeds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizer

from ragkit.artifacts import Manifest, artifact_input, read_upstream
from ragkit.config import TrainRetrieverConfig
from ragkit.errors import RagkitError
from ragkit.evaluation import PassageLookup
from ragkit.retriever.data import BatchCollator, ResumableBatchSampler, RetrievalExamples
from ragkit.retriever.encoder import BiEncoder, load_tokenizer, tokenize_passages
from ragkit.retriever.losses import ContrastiveLoss
from ragkit.retriever.checkpoints import STATE_FILE, latest_checkpoint
from ragkit.retriever.dev_evaluation import DevEvaluation
from ragkit.retriever.negative_cache.estimator import staleness
from ragkit.retriever.negative_cache.step import NegativeCacheStep
from ragkit.retriever.trainer import parameter_groups, run, warmup_linear_decay, work_dir_for

TOPICS = 24
WORDS_PER_TOPIC = 6


# --- fixtures ----------------------------------------------------------------------------------------


def topic_words(topic: int) -> list[str]:
    return [f"w{topic}x{j}" for j in range(WORDS_PER_TOPIC)]


def corpus() -> tuple[list[dict], list[dict], list[dict]]:
    """Two passages per topic (one holds the answer), and one question per topic."""
    rng = random.Random(0)
    common = [f"c{i}" for i in range(10)]
    passages, train, dev = [], [], []
    for t in range(TOPICS):
        words = topic_words(t)
        for k in range(2):
            text = " ".join(rng.sample(words, 4) + rng.sample(common, 4) + ([f"ans{t}"] if k == 0 else []))
            passages.append({"id": f"p{t}-{k}", "title": f"title{t}", "text": text, "doc_id": f"d{t}"})
    for t in range(TOPICS):
        question = {
            "id": f"q{t}",
            "question": " ".join(["which"] + rng.sample(topic_words(t), 3)),
            "answers": [f"ans{t}"],
            "positive_ids": [f"p{t}-0"],
            "hard_negative_ids": [],
            "doc_ids": [f"d{t}"],
            "doc_scores": [1],
        }
        (dev if t % 4 == 0 else train).append(question)
    return passages, train, dev


def write_ingest(root: Path) -> Path:
    passages, train, dev = corpus()
    out = root / "ingest"
    datasets.Dataset.from_list(passages).save_to_disk(str(out / "passages"))
    for split, rows in (("train", train), ("dev", dev)):
        datasets.Dataset.from_list(rows).save_to_disk(str(out / "questions" / split))
    Manifest(stage="ingest", counts={"passages": len(passages)}).save(out)
    return out


def write_mine(root: Path, ingest: Path) -> Path:
    """Hard negatives: the topic's second passage first, then passages of the two next topics."""
    _, train, _ = corpus()
    out = root / "mine"
    rows = []
    for q in train:
        t = int(q["id"][1:])
        negatives = [f"p{t}-1"] + [f"p{(t + d) % TOPICS}-{k}" for d in (1, 2) for k in (0, 1)]
        rows.append({**{k: q[k] for k in ("id", "question", "answers", "positive_ids")},
                     "hard_negative_ids": negatives, "random_negative_ids": []})
    datasets.Dataset.from_list(rows).save_to_disk(str(out / "examples" / "train"))
    Manifest(stage="mine", inputs=[artifact_input(ingest)], config={"match_type": "string"},
             metrics={"dev": {"accuracy@20": 0.5}}).save(out)
    return out


def write_tiny_model(directory: Path, dropout: float = 0.1, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT over the corpus' words, with its tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in range(TOPICS) for w in topic_words(t)} | {f"ans{t}" for t in range(TOPICS)}
                   | {f"title{t}" for t in range(TOPICS)} | {f"c{i}" for i in range(10)} | {"which"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    ingest = write_ingest(root)
    return {"ingest": ingest, "mine": write_mine(root, ingest), "model": write_tiny_model(root / "tiny"),
            "still": write_tiny_model(root / "still", dropout=0.0)}


def config(artifacts, out: Path, **overrides) -> TrainRetrieverConfig:
    settings = dict(mine=str(artifacts["mine"]), out=str(out), model=str(artifacts["model"]), batch_size=4,
                    hard_negatives=2, max_steps=4, lr=1e-3, warmup=0.25, query_max_length=16,
                    passage_max_length=24, eval_batch_size=8, device="cpu", seed=3)
    settings.update(overrides)
    return TrainRetrieverConfig(**settings)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [line["loss"] for line in train_lines(out / "metrics.jsonl") if "loss" in line]


def train_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "examples_per_s"} for line in lines]


# --- data --------------------------------------------------------------------------------------------


def test_sampler_shards_the_global_batch_in_rank_order_and_resumes_mid_epoch():
    single = ResumableBatchSampler(22, 8, seed=5)
    single.set_epoch(1)
    global_batches = list(single)
    assert len(global_batches) == 2  # 22 // 8, the partial batch dropped
    shards = []
    for rank in range(2):
        sampler = ResumableBatchSampler(22, 8, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    assert [a + b for a, b in zip(*shards)] == global_batches
    single.set_epoch(1, start_batch=1)
    assert list(single) == global_batches[1:]
    single.set_epoch(2)
    assert list(single) != global_batches
    with pytest.raises(RagkitError, match="does not split evenly"):
        ResumableBatchSampler(22, 9, world_size=2)


def _examples(mined: list[str], positives: list[str], randoms: list[str], n: int, offset: int = 0) -> RetrievalExamples:
    passages, _, _ = corpus()
    lookup = PassageLookup(datasets.Dataset.from_list(passages))
    rows = datasets.Dataset.from_list([{"id": "q", "question": "which", "answers": [], "positive_ids": positives,
                                        "hard_negative_ids": mined, "random_negative_ids": randoms},
                                       {"id": "none", "question": "which", "answers": [], "positive_ids": [],
                                        "hard_negative_ids": [], "random_negative_ids": []}])
    return RetrievalExamples(rows, lookup, hard_negatives=n, seed=1, negative_offset=offset)


def test_hard_negatives_and_positives_rotate_across_epochs():
    mined = [f"p{t}-1" for t in range(5)]
    examples = _examples(mined, ["p0-0", "p1-0"], [], n=2)
    assert len(examples) == 1 and examples.skipped == 1
    seen = []
    for epoch in range(3):
        examples.set_epoch(epoch)
        seen.append((examples[0].positive_id, examples[0].negative_ids))
    assert seen == [("p0-0", mined[0:2]), ("p1-0", mined[2:4]), ("p0-0", [mined[4], mined[0]])]


def test_negative_offset_skips_the_top_mined_ranks_before_rotating():
    mined = [f"p{t}-1" for t in range(5)]
    examples = _examples(["p0-0"] + mined, ["p0-0"], ["p4-0"], n=2, offset=3)  # the positive is dropped first
    seen = []
    for epoch in range(2):
        examples.set_epoch(epoch)
        seen.append(examples[0].negative_ids)
    assert seen == [mined[3:5], mined[3:5]]
    deep = _examples(mined, ["p0-0"], ["p4-0"], n=2, offset=4)  # one mined left, then the random negative
    assert deep[0].negative_ids == [mined[4], "p4-0"]


def test_a_short_mined_list_is_padded_with_random_then_seeded_corpus_negatives():
    examples = _examples(["p3-1", "p0-0"], ["p0-0"], ["p4-1", "p3-1"], n=4)
    examples.set_epoch(0)
    first = examples[0].negative_ids
    assert first[:2] == ["p3-1", "p4-1"]  # the positive is never a negative; duplicates are dropped
    assert len(set(first)) == 4 and "p0-0" not in first
    assert examples[0].negative_ids == first  # the draw is seeded by (seed, epoch, item)
    examples.set_epoch(1)
    assert examples[0].negative_ids[:2] == first[:2]


def test_collated_passages_follow_the_loss_layout(artifacts):
    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2)
    tokenizer = load_tokenizer(str(artifacts["model"]))
    batch = BatchCollator(tokenizer, lookup, 16, 24)([examples[i] for i in (0, 3, 5)])
    assert batch.query["input_ids"].shape[0] == 3 and batch.passage["input_ids"].shape[0] == 9
    for i in range(3):
        item = examples[(0, 3, 5)[i]]
        assert batch.passage_ids[i * 3 : i * 3 + 3] == [item.positive_id, *item.negative_ids]
    text = tokenizer.decode(batch.passage["input_ids"][0], skip_special_tokens=False)
    assert text.startswith(f"[CLS] {batch.titles[0]} [SEP]")


def test_no_weight_decay_on_biases_and_layer_norms(artifacts):
    model = BiEncoder.from_pretrained(str(artifacts["model"]))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): name for name, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_warmup_then_linear_decay():
    factors = [warmup_linear_decay(s, 2, 6) for s in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


# --- the stage ---------------------------------------------------------------------------------------


def _loss_on(model_dir: Path, artifacts, guide: Path | None = None) -> float:
    """Contrastive loss of a model over all training examples at once, dropout off."""
    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2)
    batch = BatchCollator(load_tokenizer(str(model_dir)), lookup, 16, 24)([examples[i] for i in range(len(examples))])
    model = BiEncoder.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return float(ContrastiveLoss(0.05)(model(**batch.query, tower="query"), model(**batch.passage, tower="passage")))


def test_training_reduces_the_loss_and_writes_the_artifact(artifacts, tmp_path):
    out = tmp_path / "retriever"
    manifest = run(config(artifacts, out, max_steps=20, eval_every=10, select_metric="mrr@10"))
    assert manifest.path == out and manifest.stage == "train-retriever"
    assert _loss_on(out, artifacts) < 0.7 * _loss_on(artifacts["model"], artifacts)

    assert {p.name for p in out.iterdir()} == {"query_encoder", "passage_encoder", "retriever.json", "metrics.jsonl", "manifest.json"}
    assert not work_dir_for(out).exists()
    assert manifest.counts["steps"] == 20 and manifest.counts["examples_seen"] == 80
    assert manifest.counts["train_examples"] == 18 and manifest.counts["dev_questions"] == 6
    assert manifest.metrics["select_metric"] == "mrr@10" and manifest.metrics["bm25_dev"] == {"accuracy@20": 0.5}
    assert manifest.inputs[0]["stage"] == "mine"
    read_upstream(out, "train-retriever")
    log = train_lines(out / "metrics.jsonl")
    assert [line["step"] for line in log if "loss" in line] == list(range(1, 21))
    evals = [line for line in log if line.get("split") == "dev"]
    assert [line["step"] for line in evals] == [0, 10, 20]
    assert manifest.metrics["dev_start"] == {k: v for k, v in evals[0].items() if k not in ("step", "split")}
    best = max(evals[1:], key=lambda line: line["mrr@10"])  # the starting model is never the one kept
    assert manifest.metrics["best_step"] == best["step"] and manifest.metrics["dev"] == {k: v for k, v in best.items() if k not in ("step", "split")}
    spec = json.loads((out / "retriever.json").read_text())
    assert spec["temperature"] == 0.05 and spec["query_max_length"] == 16 and spec["shared"] is True


def test_the_artifact_loads_with_transformers_and_sentence_transformers(artifacts, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "retriever"
    run(config(artifacts, out, max_steps=2))
    tower = out / "passage_encoder"
    ours = BiEncoder.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tower)
    texts = ["which w3x1 w3x2 c4", "c1 c2 ans7"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(tower).eval()(**inputs).last_hidden_state  # (2, L, 32)
        expected = ours(inputs["input_ids"], inputs["attention_mask"], tower="passage")
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
    st = SentenceTransformer(str(tower), device="cpu")
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_known_positives", [True, False])
def test_first_logged_loss_is_the_contrastive_loss_of_the_starting_model(artifacts, tmp_path, mask_known_positives):
    """The loop feeds the loss the sampler's first batch with the configured temperature (dropout off), and
    the corpus rows of its labelled passages unless masking is off."""
    cfg = config(artifacts, tmp_path / "r", model=str(artifacts["still"]), max_steps=1, temperature=0.1, loss="gte",
                 mask_known_positives=mask_known_positives)
    run(cfg)
    logged = losses(tmp_path / "r")[0]

    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2, seed=3)
    sampler = ResumableBatchSampler(len(examples), 4, seed=3)
    batch = BatchCollator(load_tokenizer(str(artifacts["still"])), lookup, 16, 24)([examples[i] for i in next(iter(sampler))])
    model = BiEncoder.from_pretrained(str(artifacts["still"]))
    directions = ("query_to_passage", "query_to_query", "passage_to_query", "passage_to_passage")
    loss_fn = ContrastiveLoss(0.1, directions=directions)
    with torch.no_grad():
        query, passage = model(**batch.query, tower="query"), model(**batch.passage, tower="passage")
        labelled = loss_fn(query, passage, **batch.labels(examples.max_known()))
        unlabelled = loss_fn(query, passage)
    assert float(labelled) != pytest.approx(float(unlabelled), rel=1e-3)  # this batch has questions sharing passages
    assert logged == pytest.approx(float(labelled if mask_known_positives else unlabelled), rel=1e-5)


def test_gradient_cache_trains_to_the_same_weights_as_the_plain_step(artifacts, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run(config(artifacts, plain, model=str(artifacts["still"]), max_steps=3))
    run(config(artifacts, cached, model=str(artifacts["still"]), max_steps=3, chunk_size=3))
    a, b = weights(plain / "query_encoder"), weights(cached / "query_encoder")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    assert losses(plain) == pytest.approx(losses(cached), rel=1e-4)


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_exactly_the_uninterrupted_weights(artifacts, tmp_path):
    """Dropout on, two towers, evaluation and best-model selection, an epoch boundary (4 batches/epoch)."""
    settings = dict(max_steps=7, checkpoint_every=2, eval_every=3, shared=False)
    whole = tmp_path / "whole"
    run(config(artifacts, whole, **settings))

    out = tmp_path / "resumed"

    def crash_at_5(step: int) -> None:
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        run(config(artifacts, out, **settings), on_step=crash_at_5)
    assert not out.exists()
    assert latest_checkpoint(work_dir_for(out)).name == "step-4"
    assert (latest_checkpoint(work_dir_for(out)) / STATE_FILE).is_file()
    with pytest.raises(RagkitError, match="--resume"):
        run(config(artifacts, out, **settings))
    with pytest.raises(RagkitError, match="lr="):
        run(config(artifacts, out, resume=True, **{**settings, "lr": 5e-4}))

    run(config(artifacts, out, resume=True, **settings))
    assert not work_dir_for(out).exists()
    for tower in ("query_encoder", "passage_encoder"):
        a, b = weights(whole / tower), weights(out / tower)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{tower}/{name} differs"
    assert train_lines(whole / "metrics.jsonl") == train_lines(out / "metrics.jsonl")
    assert Manifest.load(whole).metrics == Manifest.load(out).metrics


def test_a_guide_model_runs_through_the_loss(artifacts, tmp_path):
    """GIST: with the starting model as its own guide (dropout off), the first logged loss equals the
    guided loss computed independently on the first batch."""
    still = str(artifacts["still"])
    run(config(artifacts, tmp_path / "r", model=still, guide=still, max_steps=1, guide_margin=0.05))
    logged = losses(tmp_path / "r")[0]

    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2, seed=3)
    batch = BatchCollator(load_tokenizer(still), lookup, 16, 24)([examples[i] for i in next(iter(ResumableBatchSampler(18, 4, seed=3)))])
    model = BiEncoder.from_pretrained(still)
    with torch.no_grad():
        query, passage = model(**batch.query, tower="query"), model(**batch.passage, tower="passage")
        guided = ContrastiveLoss(0.05, guide_margin_strategy="absolute", guide_margin=0.05)(query, passage, query, passage)
        unguided = ContrastiveLoss(0.05)(query, passage)
    assert logged == pytest.approx(float(guided), rel=1e-5)
    assert float(guided) != pytest.approx(float(unguided), rel=1e-3)


def test_fp16_on_cpu_and_a_wrong_stage_are_refused(artifacts, tmp_path):
    with pytest.raises(RagkitError, match="fp16 needs a CUDA device"):
        run(config(artifacts, tmp_path / "r", precision="fp16"))
    with pytest.raises(RagkitError, match="written by stage 'ingest'"):
        run(config(artifacts, tmp_path / "r", mine=str(artifacts["ingest"])))
    assert not (tmp_path / "r").exists() and not work_dir_for(tmp_path / "r").exists()


def test_bf16_autocast_trains_on_cpu(artifacts, tmp_path):
    manifest = run(config(artifacts, tmp_path / "r", precision="bf16", max_steps=2, chunk_size=2))
    logged = losses(tmp_path / "r")
    assert len(logged) == 2 and all(0 < loss < 10 for loss in logged)
    assert manifest.counts["steps"] == 2


def _first_batches(model_dir: Path, artifacts, count: int):
    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2, seed=3)
    collate = BatchCollator(load_tokenizer(str(model_dir)), lookup, 16, 24)
    sampler = ResumableBatchSampler(len(examples), 4, seed=3)
    return [collate([examples[i] for i in indices]) for indices, _ in zip(sampler, range(count))]


def known_width(batch) -> int:
    answers = batch.answer_rows or [[] for _ in batch.positive_rows]
    return max(len(set(p) | set(a)) for p, a in zip(batch.positive_rows, answers))


def test_the_negative_cache_adds_the_previous_steps_passages_to_the_softmax(artifacts, tmp_path):
    """Step 2's logged loss is the cross-entropy over batch 2 plus batch 1's passages as encoded at step 1
    (their stale embeddings), without each question's positives and batch 2's own passages."""
    still = str(artifacts["still"])
    settings = dict(model=still, negative_cache=64, warmup=0, eval_every=0)
    run(config(artifacts, tmp_path / "one", max_steps=1, **settings))
    run(config(artifacts, tmp_path / "two", max_steps=2, **settings))
    logged = losses(tmp_path / "two")

    first, second = _first_batches(artifacts["still"], artifacts, 2)
    start, after_one = BiEncoder.from_pretrained(still).eval(), BiEncoder.from_pretrained(str(tmp_path / "one")).eval()
    with torch.no_grad():
        cached = start(**first.passage, tower="passage")  # (12, D), stale by step 2
        expected_first = ContrastiveLoss(0.05)(start(**first.query, tower="query"), cached, **first.labels(known_width(first)))
        query, passage = after_one(**second.query, tower="query"), after_one(**second.passage, tower="passage")
    total = 0.0
    for i in range(4):
        known = set(second.positive_rows[i]) | set(second.answer_rows[i] if second.answer_rows else [])
        in_batch = [k for k, row in enumerate(second.passage_rows) if k == i * 3 or row not in known]
        blocked = set(second.positive_rows[i]) | set(second.passage_rows)
        keep = [j for j, row in enumerate(first.passage_rows) if row not in blocked]
        keep = list({first.passage_rows[j]: j for j in keep}.values())  # the cache holds each passage once
        logits = torch.cat([query[i] @ passage[in_batch].T, query[i] @ cached[keep].T]) / 0.05
        total += float(torch.logsumexp(logits, 0) - query[i] @ passage[i * 3] / 0.05)
    assert logged[0] == pytest.approx(float(expected_first), rel=1e-5)
    assert logged[1] == pytest.approx(total / 4, rel=1e-4)
    assert logged[1] != pytest.approx(float(ContrastiveLoss(0.05)(query, passage)), rel=1e-2)  # the cache counts

    # Step 1 met an empty cache; step 2 the distinct passages of batch 1, encoded before the update.
    records = [line for line in train_lines(tmp_path / "two" / "metrics.jsonl") if "loss" in line]
    assert [line["cache_size"] for line in records] == [0, len(set(first.passage_rows))]
    assert records[0]["cache_staleness"] is None and records[1]["cache_staleness"] > 1e-4


def test_resume_with_a_negative_cache_is_exact(artifacts, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, negative_cache=8, eval_every=0)
    run(config(artifacts, tmp_path / "whole", **settings))

    def crash_at_3(step: int) -> None:
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        run(config(artifacts, tmp_path / "resumed", **settings), on_step=crash_at_3)
    run(config(artifacts, tmp_path / "resumed", resume=True, **settings))
    assert losses(tmp_path / "whole") == losses(tmp_path / "resumed")
    a, b = weights(tmp_path / "whole" / "query_encoder"), weights(tmp_path / "resumed" / "query_encoder")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_capped_dev_search_keeps_every_positive_and_judged_passage(artifacts):
    lookup = PassageLookup.open(artifacts["ingest"])
    questions = datasets.load_from_disk(str(artifacts["ingest"] / "questions" / "dev"))
    judged = {f"p{t}-{k}" for t in range(0, TOPICS, 4) for k in (0, 1)}  # both passages of each judged document
    tight = DevEvaluation(questions, lookup, None, max_passages=10, seed=0, match_type="string")
    assert set(tight.passage_ids) == judged and tight.subset
    roomy = DevEvaluation(questions, lookup, None, max_passages=20, seed=0, match_type="string")
    assert len(roomy.passage_ids) == 20 and judged <= set(roomy.passage_ids)
    assert roomy.passage_ids == DevEvaluation(questions, lookup, None, 20, 0, "string").passage_ids  # seeded
    metrics = roomy.evaluate(BiEncoder.from_pretrained(str(artifacts["model"])), load_tokenizer(str(artifacts["model"])),
                             None, 8, 16, 24)
    assert metrics["passages_searched"] == 20 and metrics["questions"] == 6
    assert {"accuracy@20", "mrr@10", "ndcg@10"} <= set(metrics) and metrics["accuracy@100"] == 1.0


# --- the negative cache step -------------------------------------------------------------------------

ANSWER_HOLDER, SECOND_POSITIVE = "p5-0", "p1-1"
FILLERS = ["p6-0", "p7-1", "p8-0", "p9-1"]


def _cache_step_and_batch(artifacts):
    """A step whose cache holds, besides fillers, the second positive and an answer-bearing passage of the
    batch's first question, both scored far above everything else by both questions; the second question
    lists no answer passages."""
    still = str(artifacts["still"])
    lookup = PassageLookup.open(artifacts["ingest"])
    rows = datasets.Dataset.from_list([
        {"id": "q1", "question": "which w1x0 w1x1", "answers": ["ans1"], "positive_ids": ["p1-0", SECOND_POSITIVE],
         "hard_negative_ids": ["p3-1"], "random_negative_ids": [],
         "answer_passage_ids": ["p1-0", SECOND_POSITIVE, ANSWER_HOLDER]},
        {"id": "q2", "question": "which w2x0 w2x1", "answers": ["ans2"], "positive_ids": ["p2-0"],
         "hard_negative_ids": ["p2-1"], "random_negative_ids": [], "answer_passage_ids": []},
    ])
    examples = RetrievalExamples(rows, lookup, hard_negatives=1)
    tokenizer = load_tokenizer(still)
    batch = BatchCollator(tokenizer, lookup, 16, 24)([examples[0], examples[1]])
    model = BiEncoder.from_pretrained(still)
    step = NegativeCacheStep(model, 16, model.embedding_dim, 24, 0.05, "dot", torch.device("cpu"), seed=0, rank=0,
                             autocast_dtype=None, scaler=None)
    cached_ids = [SECOND_POSITIVE, ANSWER_HOLDER] + FILLERS
    cached_rows = lookup.rows(cached_ids)
    tokens = tokenize_passages(tokenizer, lookup.titles_at(cached_rows), lookup.texts_at(cached_rows), 24)
    with torch.no_grad():
        query = model(**batch.query, tower="query")  # (2, D)
        stale = model(**tokens, tower="passage")  # (6, D)
    stale[:2] = 5 * query.sum(dim=0)  # logits of ~100 or more: unmasked, these two win every draw
    step.cache.add(stale, torch.tensor(cached_rows), tokens["input_ids"], tokens["attention_mask"])
    return step, batch, model, lookup, stale, cached_rows


def test_the_cache_never_offers_a_question_its_positives_or_answer_passages(artifacts):
    step, batch, model, lookup, stale, cached_rows = _cache_step_and_batch(artifacts)
    forbidden = set(lookup.rows([SECOND_POSITIVE, ANSWER_HOLDER]))
    assert batch.answer_rows == [lookup.rows(["p1-0", SECOND_POSITIVE, ANSWER_HOLDER]), []]
    with torch.no_grad():
        query = model(**batch.query, tower="query")  # (2, D)
    drawn = [step.draw(batch, query).ids[:, 0].tolist() for _ in range(40)]
    assert not forbidden & {first for first, _ in drawn}
    assert forbidden & {second for _, second in drawn}  # the other question, which may use them, does

    recorded = []
    draw = step.draw
    step.draw = lambda b, q: recorded.append(draw(b, q)) or recorded[-1]
    logged = float(step(batch, batch.query, batch.passage))

    # The logged loss is the exact cross-entropy over the batch plus each question's allowed cache entries.
    with torch.no_grad():
        query, passage = model(**batch.query, tower="query"), model(**batch.passage, tower="passage")  # (2, D), (4, D)

    def cross_entropy(blocked_per_query):
        total = 0.0
        for i in range(2):
            blocked = blocked_per_query[i] | set(batch.passage_rows)
            keep = [j for j, row in enumerate(cached_rows) if row not in blocked]
            logits = torch.cat([query[i] @ passage.T, query[i] @ stale[keep].T]) / 0.05
            total += float(torch.logsumexp(logits, 0) - query[i] @ passage[i * 2] / 0.05)
        return total / 2

    masked = [set(batch.positive_rows[i]) | set(batch.answer_rows[i]) for i in range(2)]
    assert logged == pytest.approx(cross_entropy(masked), rel=1e-5)
    assert logged != pytest.approx(cross_entropy([set(batch.positive_rows[0]), set()]), rel=1e-2)  # the answer mask counts

    # Staleness: the drawn items' cached embeddings against the encoder's (unchanged: no optimiser step).
    (used,) = recorded
    with torch.no_grad():
        fresh = model(**used.inputs(), tower="passage")  # (2, D)
    expected = staleness(used.cached, fresh, used.valid)
    assert step.stats["cache_size"] == 6
    assert step.stats["cache_staleness"] == pytest.approx(float(expected), rel=1e-5)
    assert step.stats["cache_staleness"] > 0.1  # the two planted embeddings are far from their encodings


def test_examples_mined_before_answer_passages_were_listed_have_none(artifacts):
    lookup = PassageLookup.open(artifacts["ingest"])
    examples = RetrievalExamples(datasets.load_from_disk(str(artifacts["mine"] / "examples" / "train")), lookup, 2)
    assert examples[0].answer_passage_ids == []
    batch = BatchCollator(load_tokenizer(str(artifacts["model"])), lookup, 16, 24)([examples[0], examples[1]])
    assert batch.answer_rows == [[], []]


def test_a_validation_split_chooses_the_kept_model_and_dev_is_never_read(tmp_path, artifacts):
    import shutil

    root = tmp_path / "with-validation"
    ingest = root / "ingest"
    shutil.copytree(artifacts["ingest"], ingest)
    dev = datasets.load_from_disk(str(ingest / "questions" / "dev"))
    # The validation questions are the dev ones with their ids renamed; dev itself becomes unscorable
    # rubbish, so a trainer that read it would fail or report different numbers.
    dev.map(lambda q: {"id": "v-" + q["id"]}).save_to_disk(str(ingest / "questions" / "validation"))
    shutil.rmtree(ingest / "questions" / "dev")
    datasets.Dataset.from_list([{"id": "x", "question": "which", "answers": [], "positive_ids": ["nope"],
                                 "doc_ids": [], "doc_scores": []}]).save_to_disk(str(ingest / "questions" / "dev"))
    Manifest(stage="ingest", counts={"passages": 1}).save(ingest)
    mine = write_mine(root, ingest)
    same = run(config(artifacts, tmp_path / "plain", max_steps=2, eval_every=1, select_metric="mrr@10"))
    manifest = run(config({**artifacts, "mine": mine}, tmp_path / "out", max_steps=2, eval_every=1, select_metric="mrr@10"))
    assert manifest.metrics["eval_split"] == "validation" and "dev" not in manifest.metrics
    assert manifest.counts["validation_questions"] == 6
    assert manifest.metrics["validation"] == same.metrics["dev"] and manifest.metrics["best_step"] == same.metrics["best_step"]
    assert {line.get("split") for line in train_lines(tmp_path / "out" / "metrics.jsonl") if "split" in line} == {"validation"}
