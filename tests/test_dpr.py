"""DPR checkpoints as starting towers (``--model`` + ``--passage-model``), and trained retrievers exported
back to DPR's ``question_encoder/`` + ``ctx_encoder/`` layout, checked against transformers' own DPR classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_cli import SMALL
from test_trainer import corpus
from transformers import (BertConfig, BertModel, DPRConfig, DPRContextEncoder, DPRContextEncoderTokenizer,
                          DPRQuestionEncoder, DPRQuestionEncoderTokenizer)
from typer.testing import CliRunner

from ragkit.artifacts import Manifest
from ragkit.cli import app
from ragkit.config import TrainRetrieverConfig
from ragkit.errors import RagkitError
from ragkit.retriever.encoder import (BiEncoder, RetrieverSpec, load_tokenizer, load_tower, tokenize_passages,
                                      tokenize_queries)
from ragkit.retriever.trainer import work_dir_for

DPR_CLASSES = {"query": (DPRQuestionEncoder, DPRQuestionEncoderTokenizer),
               "passage": (DPRContextEncoder, DPRContextEncoderTokenizer)}


def write_tiny_dpr(directory: Path, template: Path, tower: str, projection_dim: int = 0, seed: int = 0) -> Path:
    """A 2-layer, 32-wide DPR encoder saved as a hub checkpoint is, over the vocabulary of the tiny BERT at ``template``."""
    config = DPRConfig(vocab_size=BertConfig.from_pretrained(template).vocab_size, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                       projection_dim=projection_dim)
    model_class, tokenizer_class = DPR_CLASSES[tower]
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    tokenizer = tokenizer_class(vocab=str(template / "vocab.txt"), do_lower_case=True)
    assert len(tokenizer.get_vocab()) == len((template / "vocab.txt").read_text().split())
    tokenizer.save_pretrained(directory)
    return directory


def write_pair(root: Path, template: Path, projection_dim: int = 0) -> tuple[Path, Path]:
    return (write_tiny_dpr(root / "question", template, "query", projection_dim, seed=1),
            write_tiny_dpr(root / "ctx", template, "passage", projection_dim, seed=2))


def inputs(tokenizer) -> tuple[dict, dict]:
    """Five questions and passages of the corpus, tokenised as ragkit does (padding included)."""
    passages, train, _ = corpus()
    query = tokenize_queries(tokenizer, [q["question"] for q in train[:5]], 16)
    passage = tokenize_passages(tokenizer, [p["title"] for p in passages[:5]], [p["text"] for p in passages[:5]], 24)
    assert tokenizer.unk_token_id not in query["input_ids"] and tokenizer.unk_token_id not in passage["input_ids"]
    return query, passage


@torch.no_grad()
def ragkit_embeddings(encoder: BiEncoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    query, passage = inputs(tokenizer)
    encoder.eval()
    return encoder.encode_query(**query), encoder.encode_passage(**passage)  # (5, D), (5, D)


@torch.no_grad()
def dpr_embeddings(question_dir: Path, ctx_dir: Path, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``pooler_output`` of transformers' DPR classes on the same token ids."""
    query, passage = inputs(tokenizer)
    question_encoder = DPRQuestionEncoder.from_pretrained(question_dir).eval()
    ctx_encoder = DPRContextEncoder.from_pretrained(ctx_dir).eval()
    return question_encoder(**query).pooler_output, ctx_encoder(**passage).pooler_output


@torch.no_grad()
def cls_by_hand(weights_file: Path, prefix: str, config: BertConfig, batch: dict) -> torch.Tensor:
    """The [CLS] state of a BertModel built from the ``prefix``-ed weights, through ``encode_proj`` if saved."""
    weights = load_file(str(weights_file))
    bert = BertModel(config, add_pooling_layer=False).eval()
    bert.load_state_dict({k[len(prefix + "bert_model."):]: v for k, v in weights.items() if k.startswith(prefix + "bert_model.")})
    vectors = bert(**batch).last_hidden_state[:, 0]  # (B, H)
    if prefix + "encode_proj.weight" in weights:
        vectors = vectors @ weights[prefix + "encode_proj.weight"].T + weights[prefix + "encode_proj.bias"]  # (B, P)
    return vectors


def train(args: list[str]):
    return CliRunner().invoke(app, ["train", "retriever", *args])


# --- starting from DPR -------------------------------------------------------------------------------


@pytest.mark.parametrize("projection_dim", [0, 8])
def test_a_dpr_pair_embeds_as_transformers_dpr_and_survives_save_and_load(mined, tmp_path, projection_dim):
    question_dir, ctx_dir = write_pair(tmp_path, mined / "tiny", projection_dim)
    encoder = BiEncoder.from_pretrained(str(question_dir), passage_model=str(ctx_dir))
    assert (encoder.pooling, encoder.normalize, encoder.shared) == ("dpr", False, False)
    assert encoder.embedding_dim == (projection_dim or 32)
    tokenizer = load_tokenizer(str(question_dir), str(ctx_dir))
    query, passage = ragkit_embeddings(encoder, tokenizer)
    expected_query, expected_passage = dpr_embeddings(question_dir, ctx_dir, tokenizer)
    torch.testing.assert_close(query, expected_query, rtol=0, atol=0)
    torch.testing.assert_close(passage, expected_passage, rtol=0, atol=0)

    spec = RetrieverSpec(shared=False, pooling="dpr", normalize=False, query_max_length=16, passage_max_length=24)
    encoder.save_pretrained(tmp_path / "retriever", tokenizer, spec)
    reloaded = BiEncoder.from_pretrained(str(tmp_path / "retriever"))
    for got, expected in zip(ragkit_embeddings(reloaded, tokenizer), (query, passage)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The towers keep DPR's layout: BERT under `question_encoder.bert_model.` / `ctx_encoder.bert_model.`,
    # the projection under `encode_proj`; no sentence-transformers files, which could not project.
    bert_config = BertConfig(vocab_size=encoder.query_model.config.vocab_size, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    batches = inputs(tokenizer)
    for tower_dir, prefix, batch, expected in (("query_encoder", "question_encoder.", batches[0], query),
                                               ("passage_encoder", "ctx_encoder.", batches[1], passage)):
        directory = tmp_path / "retriever" / tower_dir
        torch.testing.assert_close(cls_by_hand(directory / "model.safetensors", prefix, bert_config, batch), expected)
        assert not (directory / "modules.json").exists()


def test_a_passage_model_starts_the_passage_tower_of_plain_models(mined):
    encoder = BiEncoder.from_pretrained(str(mined / "tiny"), passage_model=str(mined / "still"), pooling="cls")
    assert not encoder.shared and (encoder.pooling, encoder.normalize) == ("cls", True)
    for model, source in ((encoder.query_model, mined / "tiny"), (encoder.passage_model, mined / "still")):
        expected = load_tower(source).state_dict()
        assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    with pytest.raises(RagkitError, match="drop --shared"):
        BiEncoder.from_pretrained(str(mined / "tiny"), shared=True, passage_model=str(mined / "still"))
    with pytest.raises(RagkitError, match="drop --shared"):
        TrainRetrieverConfig(mine="m", model=str(mined / "tiny"), passage_model=str(mined / "still"), shared=True)


def test_a_dpr_pair_trains_through_the_cli_and_exports_back_to_dpr(mined, tmp_path):
    question_dir, ctx_dir = write_pair(tmp_path, mined / "tiny", projection_dim=8)
    out, exported = tmp_path / "retriever", tmp_path / "dpr"
    result = train([str(mined / "mine"), "--out", str(out), "--model", str(question_dir), "--passage-model",
                    str(ctx_dir), *SMALL, "--max-steps", "1", "--lr", "1e-3", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    spec = RetrieverSpec.load(out)
    assert (spec.pooling, spec.normalize, spec.shared) == ("dpr", False, False)
    for tower_dir, start in (("query_encoder", question_dir), ("passage_encoder", ctx_dir)):
        before, after = load_file(str(start / "model.safetensors")), load_file(str(out / tower_dir / "model.safetensors"))
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    trained = BiEncoder.from_pretrained(str(out))
    tokenizer = load_tokenizer(str(out))
    query, passage = ragkit_embeddings(trained, tokenizer)
    for got, expected in zip(dpr_embeddings(out / "query_encoder", out / "passage_encoder", tokenizer), (query, passage)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    result = CliRunner().invoke(app, ["export", "dpr", str(out), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert f"wrote {exported}" in result.output
    manifest = Manifest.load(exported)
    assert manifest.stage == "export-dpr" and manifest.inputs[0]["path"] == str(out.resolve())
    assert manifest.counts == {"embedding_dim": 8, "towers": 2}
    for got, expected in zip(dpr_embeddings(exported / "question_encoder", exported / "ctx_encoder", tokenizer), (query, passage)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert load_tokenizer(str(exported / "ctx_encoder")).get_vocab() == tokenizer.get_vocab()
    # The export starts a new run as --model / --passage-model with the same embeddings.
    again = BiEncoder.from_pretrained(str(exported / "question_encoder"), passage_model=str(exported / "ctx_encoder"))
    for got, expected in zip(ragkit_embeddings(again, tokenizer), (query, passage)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- exporting BERT towers ---------------------------------------------------------------------------


def write_retriever(directory: Path, template: Path, shared: bool, **spec_settings) -> BiEncoder:
    """A retriever artifact of BERT towers, as `ragkit train retriever` leaves one."""
    spec = RetrieverSpec(shared=shared, query_max_length=16, passage_max_length=24, **spec_settings)
    encoder = BiEncoder(load_tower(template / "tiny"), None if shared else load_tower(template / "still"),
                        pooling=spec.pooling, normalize=spec.normalize)
    encoder.save_pretrained(directory, load_tokenizer(str(template / "tiny")), spec)
    Manifest(stage="train-retriever").save(directory)
    return encoder


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_cls_pooled_bert_towers_export_to_dpr(mined, tmp_path, shared):
    encoder = write_retriever(tmp_path / "retriever", mined, shared, pooling="cls", normalize=False)
    result = CliRunner().invoke(app, ["export", "dpr", str(tmp_path / "retriever"), "--out", str(tmp_path / "dpr")])
    assert result.exit_code == 0, result.output
    assert Manifest.load(tmp_path / "dpr").counts["towers"] == (1 if shared else 2)
    tokenizer = load_tokenizer(str(mined / "tiny"))
    expected = ragkit_embeddings(encoder, tokenizer)
    for got, want in zip(dpr_embeddings(tmp_path / "dpr" / "question_encoder", tmp_path / "dpr" / "ctx_encoder", tokenizer), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = load_file(str(tmp_path / "dpr" / "ctx_encoder" / "model.safetensors"))
    assert all(name.startswith("ctx_encoder.bert_model.") for name in weights)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pooling": "mean", "normalize": False}, "pooling='mean'"),
        ({"pooling": "cls", "normalize": True}, "normalize=True"),
        ({"pooling": "cls", "normalize": False, "similarity": "cos"}, "similarity='cos'"),
    ],
)
def test_a_retriever_dpr_cannot_reproduce_is_not_exported(mined, tmp_path, settings, message):
    write_retriever(tmp_path / "retriever", mined, True, **settings)
    result = CliRunner().invoke(app, ["export", "dpr", str(tmp_path / "retriever"), "--out", str(tmp_path / "dpr")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {tmp_path / 'retriever' / 'retriever.json'}: {message}")
    assert "raw [CLS] vector scored by dot product" in result.output
    assert not (tmp_path / "dpr").exists()


# --- bad starting towers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(mined, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    question_dir, ctx_dir = write_pair(root, mined / "tiny")
    (root / "words").mkdir()
    (root / "words" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "which"]) + "\n")
    BertModel(BertConfig.from_pretrained(mined / "tiny"), add_pooling_layer=False).save_pretrained(root / "words")
    return {"question": question_dir, "ctx": ctx_dir, "other_question": write_tiny_dpr(root / "q2", mined / "tiny", "query"),
            "bert": mined / "tiny", "other_vocab": write_tiny_dpr(root / "v", root / "words", "passage")}


@pytest.mark.parametrize(
    "model, passage_model, extra, message",
    [
        ("ctx", "question", [], "is a DPR context encoder, it encodes passages (pass it as --passage-model"),
        ("question", "other_question", [], "is a DPR question encoder, it encodes queries (pass it as --model"),
        ("question", None, [], "its passages need the matching context encoder (add --passage-model CTX_DIR)"),
        ("question", "bert", [], "is a DPR encoder but"),
        ("question", "ctx", ["--shared"], "does not combine with shared=True (drop --shared)"),
        ("question", "ctx", ["--pooling", "mean"], "pooling='mean' does not apply (drop --pooling)"),
        ("question", "other_vocab", [], "its tokenizer's vocabulary differs"),
        ("bert", None, ["--pooling", "dpr"], "pooling='dpr' does not fit a bert tower"),
    ],
)
def test_misplaced_dpr_towers_are_refused_in_one_line(mined, towers, tmp_path, model, passage_model, extra, message):
    out = tmp_path / "r"
    args = [str(mined / "mine"), "--out", str(out), "--model", str(towers[model]), *SMALL, *extra]
    result = train(args + (["--passage-model", str(towers[passage_model])] if passage_model else []))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
    assert not out.exists() and not work_dir_for(out).exists()
