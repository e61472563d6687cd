"""Reader decoding and losses against transformers' RAG models, the generator alone, and brute force."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_generators import EOS, PAD, one_thread, tiny_bart, tiny_gpt2, tiny_llama  # noqa: F401  (one_thread: autouse fixture)

from ragkit.reader.decode import DecodingOptions, generate, rag_sequence_decode, rag_token_decode, score_candidates
from ragkit.reader.generator import ReaderInputs, load_generator
from ragkit.reader.marginalize import rag_loss

K = 3
MAX_NEW = 8
# transformers' generate, told everything our decoding does (no forced or minimum tokens, plain length penalty)
HF_OPTIONS = dict(
    max_length=MAX_NEW + 1,  # counts the decoder start token
    decoder_start_token_id=EOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    min_length=0,
    no_repeat_ngram_size=0,
    length_penalty=1.0,
    early_stopping=False,
)


def same_shape_pairs(seed: int, questions: int):
    """Questions and passages whose inputs all have one length (no padding), from random letters."""
    rnd = random.Random(seed)
    word = lambda n: "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))  # noqa: E731
    texts = [f"{word(3)} {word(4)}?" for _ in range(questions)]
    passages = [[{"title": word(5), "text": f"{word(4)} {word(4)} {word(3)}"} for _ in range(K)] for _ in range(questions)]
    return texts, passages


def mixed_length_pairs():
    questions = ["who wrote hamlet?", "where is lyon?", "what flows through rome?"]
    passages = [
        [{"title": "hamlet", "text": "a play"}, {"title": "macbeth", "text": "another play by shakespeare"}, {"title": "x", "text": "y"}],
        [{"title": "lyon", "text": "a city in france on the rhone"}, {"title": "paris", "text": "capital"}, {"title": "rhone", "text": "a river"}],
        [{"title": "tiber", "text": "river"}, {"title": "rome", "text": "the capital of italy"}, {"title": "po", "text": "a long river in the north"}],
    ]
    return questions, passages


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bart")
    tiny_bart(directory)
    return load_generator(str(directory))


@pytest.fixture(scope="module")
def short_bart(tmp_path_factory):
    """The same BART, ending answers sooner: beams finish at many steps, several at once."""
    directory = tmp_path_factory.mktemp("short_bart")
    tiny_bart(directory, eos_bias=8.0)
    return load_generator(str(directory))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama(directory, seed=3)
    return load_generator(str(directory))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(directory)
    return load_generator(str(directory))


def doc_scores_for(questions: int, seed: int = 0):
    return torch.randn(questions, K, generator=torch.Generator().manual_seed(seed)) * 2


def transformers_rag(cls, generator, label_smoothing=0.0):
    from transformers import DPRConfig, DPRQuestionEncoder, RagConfig

    question_config = DPRConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    config = RagConfig.from_question_encoder_generator_configs(question_config, generator.model.config, n_docs=K, label_smoothing=label_smoothing)
    return cls(config, question_encoder=DPRQuestionEncoder(question_config), generator=generator.model).eval()


def transformers_rag_generate(cls, generator, inputs, doc_scores, num_beams, **options):
    rag = transformers_rag(cls, generator)
    return rag.generate(
        context_input_ids=inputs.input_ids,
        context_attention_mask=inputs.attention_mask,
        doc_scores=doc_scores,
        n_docs=K,
        num_beams=num_beams,
        **HF_OPTIONS,
        **options,
    )


def strip_start(sequences: torch.Tensor) -> list[tuple[int, ...]]:
    """transformers' outputs -> our token tuples: drop the decoder start, cut after EOS."""
    result = []
    for row in sequences.tolist():
        row = row[1:]
        result.append(tuple(row[: row.index(EOS) + 1] if EOS in row else row))
    return result


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_losses_equal_transformers_rag_models(bart, kind, epsilon):
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    questions, passages = mixed_length_pairs()
    inputs = bart.encode(questions, passages)
    doc_scores = doc_scores_for(len(questions))
    targets = bart.encode_answers(["shakespeare", "on the rhone", "tiber"])
    labels = torch.cat([torch.full((len(targets), 1), EOS), targets.ids], dim=1)
    rag = transformers_rag(RagSequenceForGeneration if kind == "sequence" else RagTokenForGeneration, bart, label_smoothing=epsilon)
    with torch.no_grad():
        theirs = rag(
            context_input_ids=inputs.input_ids,
            context_attention_mask=inputs.attention_mask,
            doc_scores=doc_scores,
            labels=labels,
            n_docs=K,
            reduce_loss=False,
        ).loss
        ours = rag_loss(doc_scores, bart.token_log_probs(inputs, targets.repeat_interleave(K)), targets.ids, targets.mask, kind, epsilon)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("model", ["bart", "short_bart"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_decoding_equals_transformers(request, model, num_beams):
    from transformers import RagTokenForGeneration

    bart = request.getfixturevalue(model)
    questions, passages = mixed_length_pairs()
    inputs = bart.encode(questions, passages)
    doc_scores = doc_scores_for(len(questions), seed=1)
    theirs = transformers_rag_generate(RagTokenForGeneration, bart, inputs, doc_scores, num_beams)
    ours = rag_token_decode(bart, inputs, doc_scores, DecodingOptions(max_new_tokens=MAX_NEW, num_beams=num_beams))
    assert [h.tokens for h in ours] == strip_start(theirs)
    assert len({h.tokens for h in ours}) > 1  # the questions get different answers: a real test


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_sequence_thorough_decoding_equals_transformers(bart, num_beams):
    from transformers import RagSequenceForGeneration

    questions, passages = same_shape_pairs(0, 4)
    inputs = bart.encode(questions, passages)
    # transformers generates each passage's beams without the attention mask: inputs without padding
    assert bool(inputs.attention_mask.all())
    doc_scores = doc_scores_for(len(questions), seed=2)
    ours = rag_sequence_decode(bart, inputs, doc_scores, DecodingOptions(max_new_tokens=MAX_NEW, num_beams=num_beams))
    # transformers drops log p(z|x) for one-token answers (a lone EOS): the comparison needs none
    assert all(len(tokens) > 1 for answer in ours for tokens, _ in answer.candidates)
    assert len({answer.tokens for answer in ours}) > 1
    theirs = transformers_rag_generate(RagSequenceForGeneration, bart, inputs, doc_scores, num_beams, do_deduplication=True)
    assert [answer.tokens for answer in ours] == strip_start(theirs)


@pytest.mark.parametrize("model", ["bart", "short_bart"])
@pytest.mark.parametrize("num_beams, max_new", [(1, MAX_NEW), (3, MAX_NEW), (6, 6)])
def test_per_passage_search_equals_transformers_generate(request, model, num_beams, max_new):
    bart = request.getfixturevalue(model)
    questions, passages = mixed_length_pairs()
    inputs = bart.encode(questions, passages)
    found = generate(bart, inputs, DecodingOptions(max_new_tokens=max_new, num_beams=num_beams))
    with torch.no_grad():
        theirs = bart.model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            output_scores=True,
            return_dict_in_generate=True,
            **{**HF_OPTIONS, "max_length": max_new + 1},
        )
    # every beam, in order, with its length-normalised score
    assert [h.tokens for hypotheses in found for h in hypotheses] == strip_start(theirs.sequences)
    if num_beams > 1:
        scores = torch.tensor([h.score for hypotheses in found for h in hypotheses])
        torch.testing.assert_close(scores, theirs.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_with_one_passage_decodes_like_the_generator_alone(short_bart, num_beams):
    questions, passages = mixed_length_pairs()
    inputs = short_bart.encode(questions, [p[:1] for p in passages])
    options = DecodingOptions(max_new_tokens=MAX_NEW, num_beams=num_beams)
    ours = rag_token_decode(short_bart, inputs, torch.zeros(len(questions), 1), options)
    with torch.no_grad():
        theirs = short_bart.model.generate(inputs.input_ids, attention_mask=inputs.attention_mask, num_beams=num_beams, **HF_OPTIONS)
    assert [h.tokens for h in ours] == strip_start(theirs)
    alone = generate(short_bart, inputs, options)
    for mine, other in zip(ours, alone):
        assert mine.tokens == other[0].tokens
        assert mine.log_prob == pytest.approx(other[0].log_prob, abs=1e-5)


def manual_log_prob(generator, inputs: ReaderInputs, row: int, tokens) -> float:
    """log p(tokens | row's input), one pair at a time, without padding."""
    width = int(inputs.attention_mask[row].sum())
    with torch.no_grad():
        if generator.kind == "seq2seq":
            ids = inputs.input_ids[row : row + 1, :width]
            decoder = torch.tensor([[generator.decoder_start_token_id, *tokens[:-1]]])
            logits = generator.model(input_ids=ids, decoder_input_ids=decoder).logits[0]
        else:
            prompt = inputs.input_ids[row, -width:].tolist()
            logits = generator.model(input_ids=torch.tensor([prompt + list(tokens[:-1])])).logits[0, width - 1 :]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(sum(log_probs[t, token] for t, token in enumerate(tokens)))


def brute_force_marginals(generator, inputs, doc_scores, question, candidates):
    prior = torch.log_softmax(doc_scores[question].double(), dim=0)
    marginals = []
    for tokens in candidates:
        joint = torch.tensor([manual_log_prob(generator, inputs, question * K + z, tokens) for z in range(K)], dtype=torch.float64)
        marginals.append(float(torch.logsumexp(prior + joint, dim=0)))
    return marginals


@pytest.mark.parametrize("model, num_beams", [("bart", 2), ("llama", 1)])
def test_thorough_picks_the_best_marginal_and_fast_never_beats_it(request, model, num_beams):
    generator = request.getfixturevalue(model)
    questions, passages = mixed_length_pairs()
    inputs = generator.encode(questions, passages)
    doc_scores = doc_scores_for(len(questions), seed=3)
    options = DecodingOptions(max_new_tokens=6, num_beams=num_beams)
    thorough = rag_sequence_decode(generator, inputs, doc_scores, options, method="thorough", batch_size=5)
    fast = rag_sequence_decode(generator, inputs, doc_scores, options, method="fast")
    for question, (best, quick) in enumerate(zip(thorough, fast)):
        candidates = [tokens for tokens, _ in best.candidates]
        assert candidates == [tokens for tokens, _ in quick.candidates]  # the same pool
        assert 1 < len(candidates) <= K * num_beams
        marginals = brute_force_marginals(generator, inputs, doc_scores, question, candidates)
        assert [score for _, score in best.candidates] == pytest.approx(marginals, abs=1e-4)
        assert best.tokens == candidates[max(range(len(candidates)), key=marginals.__getitem__)]
        assert best.log_prob == pytest.approx(max(marginals), abs=1e-4)
        # fast picks from the same pool, so its exact marginal cannot beat thorough's
        assert marginals[candidates.index(quick.tokens)] <= marginals[candidates.index(best.tokens)]
        # fast leaves out the passages that did not produce a candidate: never above the exact marginal
        for (_, approx), exact in zip(quick.candidates, marginals):
            assert approx <= exact + 1e-4


def naive_greedy(generator, inputs: ReaderInputs, row: int, max_new_tokens: int) -> tuple[int, ...]:
    """Greedy decoding of one row by a full forward pass per token: no cache, no padding."""
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        width = int(inputs.attention_mask[row].sum())
        with torch.no_grad():
            if generator.kind == "seq2seq":
                decoder = torch.tensor([[generator.decoder_start_token_id, *tokens]])
                logits = generator.model(input_ids=inputs.input_ids[row : row + 1, :width], decoder_input_ids=decoder).logits
            else:
                prompt = inputs.input_ids[row, -width:].tolist()
                logits = generator.model(input_ids=torch.tensor([prompt + tokens])).logits
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == generator.eos_token_id:
            break
    return tuple(tokens)


@pytest.mark.parametrize("model", ["bart", "llama", "gpt2"])
def test_batched_cached_greedy_equals_one_row_at_a_time(request, model):
    generator = request.getfixturevalue(model)
    questions, passages = mixed_length_pairs()
    inputs = generator.encode(questions, passages)
    found = generate(generator, inputs, DecodingOptions(max_new_tokens=MAX_NEW))
    for row in range(len(inputs)):
        assert found[row][0].tokens == naive_greedy(generator, inputs, row, MAX_NEW)
        assert found[row][0].log_prob == pytest.approx(manual_log_prob(generator, inputs, row, found[row][0].tokens), abs=1e-4)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_causal_beam_search_equals_transformers(request, model):
    llama = request.getfixturevalue(model)
    questions, passages = mixed_length_pairs()
    inputs = llama.encode(questions, passages)
    found = generate(llama, inputs, DecodingOptions(max_new_tokens=MAX_NEW, num_beams=3))
    with torch.no_grad():
        theirs = llama.model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            num_beams=3,
            max_new_tokens=MAX_NEW,
            eos_token_id=list(llama.stop_token_ids),  # EOS and the line break end an answer
            pad_token_id=PAD,
            length_penalty=1.0,
            early_stopping=False,
            do_sample=False,
        )
    generated = theirs[:, inputs.input_ids.shape[1] :].tolist()
    stops = set(llama.stop_token_ids)
    expected = [tuple(row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]) for row in generated]
    assert [f[0].tokens for f in found] == expected


def test_score_candidates_equals_one_pair_at_a_time(bart):
    questions, passages = mixed_length_pairs()
    inputs = bart.encode(questions, passages)
    candidates = [[(5, 6, EOS), (7, EOS)], [(9, 9, 9, 9, EOS)], [(4, EOS), (8, 8), (30, 31, 32, EOS)]]
    scores = score_candidates(bart, inputs, candidates, K, batch_size=4)
    for question, question_candidates in enumerate(candidates):
        assert scores[question].shape == (len(question_candidates), K)
        for c, tokens in enumerate(question_candidates):
            for z in range(K):
                expected = manual_log_prob(bart, inputs, question * K + z, tokens)
                assert float(scores[question][c, z]) == pytest.approx(expected, abs=1e-4)
