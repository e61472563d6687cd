"""The reader's generator: a sequence-to-sequence model (BART) or a decoder-only causal LM, one interface.

Both read one (question, passage) pair per row and give, for a target answer, the log-probability of
each of its tokens, ``log p(y_t | x, z, y_<t)``; :mod:`ragkit.reader.marginalize` combines the rows of a
question. Rows are question-major: row ``b * K + k`` pairs question ``b`` with its ``k``-th passage.

* **seq2seq** (``AutoModelForSeq2SeqLM``; BART as in RAG): the encoder reads
  ``title / text // question``, the format of transformers' ``RagRetriever.postprocess_docs`` (the
  title's surrounding quotes dropped, double spaces collapsed, the model config's ``prefix`` in front).
  The target is the tokenised answer (``<s> answer </s>`` for BART) and the decoder reads it shifted
  right behind ``decoder_start_token_id``.
* **causal** (``AutoModelForCausalLM``: SmolLM, Qwen, Llama, ...): a REPLUG-style prompt (Shi et al.
  2023, arXiv:2301.12652), ``Title: .. / Passage: .. / Question: .. / Answer:``, behind one worked
  example (:data:`DEMONSTRATION`) and as plain text (``chat=True`` wraps it in the tokenizer's chat
  template as the user turn instead: on SmolLM2-135M-Instruct the plain one-shot prompt measured far
  better, the chat turn answering in whole sentences). The target is the answer's tokens followed by
  EOS, and ``p(y|x,z)`` is the likelihood of those tokens only (the prompt is never scored); in
  decoding a line break ends an answer too, as it does in the worked example. Prompts are padded
  on the left, so every row's answer starts at the same position and generation appends to all rows
  at once.

A passage too long for ``max_input_length`` tokens loses the end of its text, never the question.

Decoding goes step by step (:mod:`ragkit.reader.decode`): :meth:`Generator.start` reads the inputs and
returns a :class:`DecodingState` with the first next-token log-probs, :meth:`Generator.step` feeds one
token per row and returns the next log-probs, reusing the key/value cache; :meth:`DecodingState.select`
keeps, repeats or reorders rows (beams).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import RagkitError
from ..model_paths import resolve_model_path

TITLE_SEP = " / "
"""Between a passage's title and text (transformers' ``RagConfig.title_sep``)."""
DOC_SEP = " // "
"""Between the passage and the question (transformers' ``RagConfig.doc_sep``)."""
PROMPT = "Title: {title}\nPassage: {text}\nQuestion: {question}\nAnswer:"
"""The causal LMs' prompt for one (question, passage) pair."""
CLOSED_BOOK_PROMPT = "Question: {question}\nAnswer:"
"""The causal LMs' prompt for a question alone (closed-book: no passage)."""
DEMONSTRATION = {
    "title": "Marie Curie",
    "text": "Marie Curie was born in Warsaw. She later studied physics in Paris.",
    "question": "Where was Marie Curie born?",
    "answer": "Warsaw",
}
"""The one worked example in front of every causal prompt (``one_shot``): a small LM then answers with a
short span on one line instead of a sentence."""
KINDS: tuple[str, ...] = ("seq2seq", "causal")


@dataclass
class ReaderInputs:
    """Tokenised (question, passage) rows: ``input_ids`` / ``attention_mask`` ``(N, L)``."""

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> "ReaderInputs":
        return ReaderInputs(self.input_ids[rows], self.attention_mask[rows])


@dataclass
class Targets:
    """Tokenised answers, padded on the right: ``ids`` ``(M, T)``, ``mask`` ``(M, T)`` (bool, True where scored)."""

    ids: Tensor  # (M, T)
    mask: Tensor  # (M, T)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def repeat_interleave(self, repeats: int) -> "Targets":
        """Each answer ``repeats`` times in a row: one copy per passage of its question."""
        return Targets(self.ids.repeat_interleave(repeats, dim=0), self.mask.repeat_interleave(repeats, dim=0))


def pad_targets(sequences: Sequence[Sequence[int]], pad_token_id: int) -> Targets:
    """Token id lists -> :class:`Targets`, right-padded with ``pad_token_id``."""
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), max(length, 1)), pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = True
    return Targets(ids, mask)


class DecodingState(ABC):
    """What a generator keeps between decoding steps for ``N`` rows (encoder states, key/value cache)."""

    @abstractmethod
    def select(self, rows: Tensor) -> None:
        """Keep rows ``rows`` ``(N',)`` in that order (indices may repeat: a beam copied into several)."""


class Generator(ABC):
    """A generator model and its tokenizer, reading (question, passage) rows. See the module docstring."""

    kind: ClassVar[str]

    def __init__(self, model: Any, tokenizer: Any, max_input_length: int = 300) -> None:
        if max_input_length < 8:
            raise ValueError(f"max_input_length={max_input_length} must be >= 8")
        self.model = model
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        config = model.config
        self.eos_token_id: int = _first(tokenizer.eos_token_id, config.eos_token_id)
        self.pad_token_id: int = _first(tokenizer.pad_token_id, config.pad_token_id, self.eos_token_id)
        if self.eos_token_id is None:
            raise RagkitError(f"{config.name_or_path}: the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")
        self.stop_token_ids: tuple[int, ...] = (self.eos_token_id,)
        """Tokens that end an answer in decoding."""
        forward = inspect.signature(type(model).forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache``.
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ---------------------------------------------------------------------------------------

    @abstractmethod
    def render(self, question: str, title: str, text: str) -> str:
        """The text the model reads for one (question, passage) pair."""

    def encode(self, questions: Sequence[str], passages: Sequence[Sequence[Mapping[str, str]]]) -> ReaderInputs:
        """``B`` questions and ``K`` passages each (``title``, ``text``) -> ``B * K`` rows, question-major."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
        counts = {len(p) for p in passages}
        if len(counts) > 1:
            raise ValueError(f"every question needs the same number of passages, got {sorted(counts)}")
        rows = [
            self._fit(question, str(passage.get("title") or ""), str(passage.get("text") or ""))
            for question, question_passages in zip(questions, passages)
            for passage in question_passages
        ]
        return self._pad_inputs(rows)

    @abstractmethod
    def render_closed_book(self, question: str) -> str:
        """The text the model reads for a question without any passage (the closed-book baseline)."""

    def encode_closed_book(self, questions: Sequence[str]) -> ReaderInputs:
        """``B`` questions alone -> ``B`` rows (one "passage" each: none)."""
        return self._pad_inputs([self._tokenize(self.render_closed_book(q))[: self.max_input_length] for q in questions])

    @abstractmethod
    def _tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered input (with the special tokens the model expects)."""

    def _fit(self, question: str, title: str, text: str) -> list[int]:
        """Token ids of a pair, the passage text cut from its end until they fit ``max_input_length``."""
        ids = self._tokenize(self.render(question, title, text))
        for _ in range(4):
            excess = len(ids) - self.max_input_length
            if excess <= 0:
                return ids
            text = self._drop_tokens(text, excess)
            ids = self._tokenize(self.render(question, title, text))
        return ids[: self.max_input_length]  # the title and the question alone are too long

    def _drop_tokens(self, text: str, count: int) -> str:
        """``text`` without its last ``count`` tokens (as tokenised on its own; the caller checks the result)."""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            keep = max(len(offsets) - count, 0)
            return text[: offsets[keep - 1][1]] if keep else ""
        words = text.split()  # a word is at least one token
        return " ".join(words[: max(len(words) - count, 0)])

    @abstractmethod
    def _pad_inputs(self, rows: Sequence[Sequence[int]]) -> ReaderInputs:
        """Token id lists -> padded tensors."""

    @abstractmethod
    def encode_answers(self, answers: Sequence[str]) -> Targets:
        """Answers -> the target tokens scored for them."""

    # -- scoring --------------------------------------------------------------------------------------

    @abstractmethod
    def target_logits(self, inputs: ReaderInputs, targets: Targets) -> Tensor:
        """``(N, T, V)`` logits; position ``t`` predicts ``targets.ids[:, t]`` given row ``n``'s input."""

    def token_log_probs(self, inputs: ReaderInputs, targets: Targets) -> Tensor:
        """``log p(v | x, z, y_<t)`` for every vocabulary entry: ``(N, T, V)``, float32."""
        return torch.log_softmax(self.target_logits(inputs, targets).float(), dim=-1)

    def target_log_probs(self, inputs: ReaderInputs, targets: Targets) -> Tensor:
        """``log p(y_t | x, z, y_<t)`` of each target token: ``(N, T)``, 0 where ``targets.mask`` is False."""
        logits = self.target_logits(inputs, targets).float()  # (N, T, V)
        index = targets.ids.to(logits.device).masked_fill(~targets.mask.to(logits.device), 0)
        picked = logits.gather(-1, index[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N, T)
        return picked.masked_fill(~targets.mask.to(logits.device), 0.0)

    # -- decoding -------------------------------------------------------------------------------------

    @abstractmethod
    def start(self, inputs: ReaderInputs) -> tuple[DecodingState, Tensor]:
        """Read the inputs; the state and the first next-token log-probs ``(N, V)``."""

    @abstractmethod
    def step(self, state: DecodingState, tokens: Tensor) -> Tensor:
        """Feed one token per row ``(N,)``; the next-token log-probs ``(N, V)``."""

    def decode_text(self, tokens: Sequence[int]) -> str:
        """Generated ids -> text (special tokens dropped, stripped)."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    def _forward(self, **inputs: Any) -> tuple[Tensor, Any]:
        """The model's logits and key/value cache (``cache=`` in inputs is passed under the model's name for it)."""
        if "cache" in inputs:
            inputs[self._cache_arg] = inputs.pop("cache")
        out = self.model(**inputs, return_dict=True)
        cache = getattr(out, "cache", None) if self._cache_arg == "cache" else getattr(out, "past_key_values", None)
        return out.logits, cache


class _Seq2SeqState(DecodingState):
    def __init__(self, encoder_states: Tensor, attention_mask: Tensor, cache: Any) -> None:
        self.encoder_states = encoder_states  # (N, L, H)
        self.attention_mask = attention_mask  # (N, L)
        self.cache = cache

    def select(self, rows: Tensor) -> None:
        self.encoder_states = self.encoder_states[rows]
        self.attention_mask = self.attention_mask[rows]
        self.cache.reorder_cache(rows.to(self.encoder_states.device))


class Seq2SeqGenerator(Generator):
    """BART and other encoder-decoder models: ``title / text // question`` in, answer out."""

    kind = "seq2seq"

    def __init__(self, model: Any, tokenizer: Any, max_input_length: int = 300) -> None:
        super().__init__(model, tokenizer, max_input_length)
        start = _first(model.config.decoder_start_token_id, getattr(model.generation_config, "decoder_start_token_id", None))
        if start is None:
            raise RagkitError(f"{model.config.name_or_path}: no decoder_start_token_id in config.json (set it, e.g. to the EOS id for BART)")
        self.decoder_start_token_id: int = start
        self.prefix: str = getattr(model.config, "prefix", None) or ""

    def render(self, question: str, title: str, text: str) -> str:
        title = title.removeprefix('"').removesuffix('"')
        return (self.prefix + title + TITLE_SEP + text + DOC_SEP + question).replace("  ", " ")

    def render_closed_book(self, question: str) -> str:
        return (self.prefix + question).replace("  ", " ")

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def _pad_inputs(self, rows: Sequence[Sequence[int]]) -> ReaderInputs:
        padded = pad_targets(rows, self.pad_token_id)  # right padding, as the encoder expects
        return ReaderInputs(padded.ids.to(self.device), padded.mask.long().to(self.device))

    def encode_answers(self, answers: Sequence[str]) -> Targets:
        return pad_targets([self.tokenizer(answer)["input_ids"] for answer in answers], self.pad_token_id)

    def _decoder_inputs(self, targets: Targets) -> Tensor:
        start = torch.full((len(targets), 1), self.decoder_start_token_id, dtype=torch.long)
        return torch.cat([start, targets.ids[:, :-1]], dim=1).to(self.device)  # (N, T)

    def target_logits(self, inputs: ReaderInputs, targets: Targets) -> Tensor:
        logits, _ = self._forward(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            decoder_input_ids=self._decoder_inputs(targets),
            use_cache=False,
        )
        return logits  # (N, T, V)

    def start(self, inputs: ReaderInputs) -> tuple[DecodingState, Tensor]:
        encoder = self.model.get_encoder()
        encoder_states = encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, return_dict=True).last_hidden_state
        state = _Seq2SeqState(encoder_states, inputs.attention_mask, None)
        first = torch.full((len(inputs),), self.decoder_start_token_id, dtype=torch.long, device=self.device)
        return state, self.step(state, first)

    def step(self, state: DecodingState, tokens: Tensor) -> Tensor:
        assert isinstance(state, _Seq2SeqState)
        from transformers.modeling_outputs import BaseModelOutput

        logits, state.cache = self._forward(
            encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_states),
            attention_mask=state.attention_mask,
            decoder_input_ids=tokens[:, None].to(self.device),
            cache=state.cache,
            use_cache=True,
        )
        return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (N, V)


class _CausalState(DecodingState):
    def __init__(self, attention_mask: Tensor, next_position: Tensor, cache: Any) -> None:
        self.attention_mask = attention_mask  # (N, L): grows by one column per step
        self.next_position = next_position  # (N,)
        self.cache = cache

    def select(self, rows: Tensor) -> None:
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        self.cache.reorder_cache(rows.to(self.attention_mask.device))


class CausalGenerator(Generator):
    """Decoder-only LMs: the answer continues a prompt holding the passage and the question."""

    kind = "causal"

    def __init__(self, model: Any, tokenizer: Any, max_input_length: int = 300, chat: bool | None = None,
                 one_shot: bool = True, stop_at_newline: bool = True) -> None:
        super().__init__(model, tokenizer, max_input_length)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise RagkitError(f"{model.config.name_or_path}: the tokenizer has no chat template (drop chat=True)")
        self.chat: bool = bool(chat)
        self.one_shot = one_shot
        if stop_at_newline:
            self.stop_token_ids = (self.eos_token_id, *newline_tokens(tokenizer))

    def _demonstration(self, closed_book: bool) -> str:
        if not self.one_shot:
            return ""
        d = DEMONSTRATION
        prompt = CLOSED_BOOK_PROMPT if closed_book else PROMPT
        return prompt.format(title=d["title"], text=d["text"], question=d["question"]) + f" {d['answer']}\n\n"

    def render(self, question: str, title: str, text: str) -> str:
        prompt = self._demonstration(False) + PROMPT.format(title=title, text=text, question=question)
        return self.chat_prompt(prompt) if self.chat else prompt

    def render_closed_book(self, question: str) -> str:
        prompt = self._demonstration(True) + CLOSED_BOOK_PROMPT.format(question=question)
        return self.chat_prompt(prompt) if self.chat else prompt

    def chat_prompt(self, message: str) -> str:
        """``message`` as the user turn of the chat template, ready for the assistant's reply."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)

    def _tokenize(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS),
        # but not an EOS some tokenizers append: the answer follows the prompt.
        ids = self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]
        return ids[:-1] if ids and ids[-1] == self.eos_token_id else ids

    def encode_prompts(self, prompts: Sequence[str]) -> ReaderInputs:
        """Finished prompt strings (e.g. from :meth:`chat_prompt`) -> left-padded rows, for generation."""
        return self._pad_inputs([self._tokenize(prompt) for prompt in prompts])

    def _pad_inputs(self, rows: Sequence[Sequence[int]]) -> ReaderInputs:
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for n, row in enumerate(rows):
            if row:
                ids[n, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
                mask[n, length - len(row):] = 1
        return ReaderInputs(ids.to(self.device), mask.to(self.device))

    def encode_answers(self, answers: Sequence[str]) -> Targets:
        # After a plain "Answer:" the answer's first word carries its leading space, as in running text.
        lead = "" if self.chat else " "
        tokens = [self.tokenizer(lead + answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_token_id] for answer in answers]
        return pad_targets(tokens, self.pad_token_id)

    def target_logits(self, inputs: ReaderInputs, targets: Targets) -> Tensor:
        length = targets.ids.shape[1]
        ids = torch.cat([inputs.input_ids, targets.ids[:, :-1].to(self.device)], dim=1)  # (N, P + T - 1)
        mask = torch.cat([inputs.attention_mask, targets.mask[:, :-1].long().to(self.device)], dim=1)
        # The last prompt position predicts the first answer token, so the last T positions are the answer's.
        logits, _ = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False, logits_to_keep=length
        )
        return logits  # (N, T, V)

    def start(self, inputs: ReaderInputs) -> tuple[DecodingState, Tensor]:
        positions = _positions(inputs.attention_mask)  # (N, P)
        logits, cache = self._forward(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        state = _CausalState(inputs.attention_mask, positions[:, -1] + 1, cache)
        return state, torch.log_softmax(logits[:, -1].float(), dim=-1)

    def step(self, state: DecodingState, tokens: Tensor) -> Tensor:
        assert isinstance(state, _CausalState)
        ones = torch.ones((len(tokens), 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        logits, state.cache = self._forward(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=state.attention_mask,
            position_ids=state.next_position[:, None],
            cache=state.cache,
            use_cache=True,
        )
        state.next_position = state.next_position + 1
        return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (N, V)


def newline_tokens(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the single tokens that are line breaks (``\\n``, ``\\n\\n``) in this tokenizer."""
    found = []
    for text in ("\n", "\n\n"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
    return tuple(found)


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding). ``(N, L) -> (N, L)``."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _first(*values: Any) -> Any:
    """The first value that is not None; a list (several EOS ids) gives its first entry."""
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return value
    return None


def generator_kind(config: Any) -> str | None:
    """``seq2seq``, ``causal`` or None (neither) for a transformers config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) and config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    # The causal-LM mapping also lists encoder models with an LM head (BertLMHeadModel); a directory is a
    # causal LM when it was saved as one.
    causal_classes = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal_classes = {causal_classes} if isinstance(causal_classes, str) else set(causal_classes or ())
    if causal_classes & set(getattr(config, "architectures", None) or ()):
        return "causal"
    return None


def load_generator(
    name_or_path: str,
    max_input_length: int = 300,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    chat: bool | None = None,
) -> Generator:
    """A generator from a local model directory or an alias (``smollm2``); never downloads.

    The directory's config decides the kind: an encoder-decoder with a seq2seq LM head, or a model saved
    as a causal LM; anything else is refused. ``chat`` (causal only): wrap the prompt in the chat
    template (default: plain text).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(resolve_model_path(name_or_path))
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise RagkitError(f"{path}: unreadable config.json ({_first_line(exc)}); pass a generator model directory") from None
        kind = generator_kind(config)
        if kind is None:
            architectures = ", ".join(getattr(config, "architectures", None) or ()) or config.model_type
            raise RagkitError(
                f"{path}: {architectures} is neither a sequence-to-sequence nor a causal language model "
                f"(pass a BART-like or decoder-only generator directory, or smollm2)"
            )
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = auto.from_pretrained(path, config=config, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError, KeyError) as exc:
            raise RagkitError(f"{path}: cannot load the generator ({_first_line(exc)}); check the directory holds a complete model and tokenizer") from None
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    if kind == "seq2seq":
        return Seq2SeqGenerator(model, tokenizer, max_input_length)
    return CausalGenerator(model, tokenizer, max_input_length, chat=chat)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
