"""Tiny random generators for the reader tests: a BART and a Llama, each saved with a tokenizer to a directory.

Both tokenizers are byte-level BPE over lowercase letters and a little punctuation, small enough to keep
the vocabulary near 80 entries, with merges so that a space joins the next letter (``Ġa``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

LETTERS = list(string.ascii_lowercase) + list("?/.,:'\n")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: one thread, no waiting on a second one (the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vocab() -> tuple[dict[str, int], list[str]]:
    # "\u0120" is byte-level BPE's space; "\u010a" its newline.
    symbols = [("\u010a" if c == "\n" else c) for c in LETTERS]
    tokens = SPECIALS + symbols + ["\u0120"] + ["\u0120" + c for c in symbols]
    merges = [f"\u0120 {c}" for c in symbols]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_bart_tokenizer(directory: Path):
    from transformers import BartTokenizer

    vocab, merges = _vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return BartTokenizer.from_pretrained(directory)


def tiny_bart(directory: Path, seed: int = 2, eos_bias: float = 4.0):
    """A 1+1-layer BART with its tokenizer saved in ``directory``; returns (model, tokenizer).

    Random weights, drawn wide (``init_std=1``) so that answers depend on the passage; then, like a
    trained BART, it never emits ``<s>`` or ``<pad>``, and it rarely ends an answer before its first
    token (the EOS row of the output layer points away from the decoder's start token, which is EOS) but
    often after a few: with the defaults, answers of 2 to 8 tokens (more ``eos_bias``: shorter ones).
    """
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = write_bart_tokenizer(directory)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=24,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=256,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        init_std=1.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias[0, BOS] = model.final_logits_bias[0, PAD] = -30.0
        model.final_logits_bias[0, EOS] = eos_bias
        model.lm_head.weight[EOS] = -2.0 * model.model.shared.weight[EOS]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def write_causal_tokenizer(directory: Path, chat_template: str | None = None):
    """A Llama-style fast tokenizer: BOS in front of every encoded text, no EOS appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_llama(directory: Path, seed: int = 0, chat_template: str | None = None):
    """A 2-layer Llama with its tokenizer saved in ``directory``; returns (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = write_causal_tokenizer(directory, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def tiny_gpt2(directory: Path, seed: int = 0):
    """A 2-layer GPT-2 (learned absolute positions, unlike Llama's rotary ones) with the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = write_causal_tokenizer(directory)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=24, n_layer=2, n_head=2, n_positions=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer
