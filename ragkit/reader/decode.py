"""Decoding answers from retrieved passages: RAG-Token and RAG-Sequence, greedy and beam search, batched.

Lewis et al. 2020 (arXiv:2005.11401), section 2.5:

* **RAG-Token** decodes one distribution, the marginal over the passages at every step,
  ``log p(y_t | x, y_<t) = logsumexp_z [log p(z|x) + log p(y_t | x, z, y_<t)]``: each hypothesis is
  ``K`` generator rows (one per passage) that receive the same token.
* **RAG-Sequence** cannot be decoded token by token. Each passage is searched on its own (beam search,
  or greedy with ``num_beams=1``: the usual choice for causal LMs), the hypotheses of a question's
  passages are pooled, and the one with the highest ``log p(y|x) = logsumexp_z [log p(z|x) + log
  p(y|x,z)]`` wins. **Thorough** decoding scores every candidate under every passage with one more
  forward pass; **fast** decoding takes ``p(y|x,z) ~ 0`` for a passage whose search did not produce
  ``y``, so only the searches' own scores enter the sum.

Beam search follows transformers' (``generate(num_beams=...)``): ``2 * num_beams`` candidates per step,
a candidate ending in EOS among the best ``num_beams`` becomes a finished hypothesis scored
``log p / length ** length_penalty`` (length counting the EOS), the best ``num_beams`` others continue,
and a question is done once it holds ``num_beams`` finished hypotheses and its best running beam
cannot beat the worst of them (or at once, with ``early_stopping``). Reaching ``max_new_tokens`` ends
every hypothesis. Greedy search takes the argmax and stops a row at EOS. "EOS" is any of the
generator's ``stop_token_ids``: its EOS token, and for causal LMs also the newline tokens (an answer
ends with its line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import RagkitError
from .generator import Generator, ReaderInputs, pad_targets
from .marginalize import next_token_log_probs, passage_log_probs, per_passage

METHODS: tuple[str, ...] = ("thorough", "fast")


@dataclass
class DecodingOptions:
    """How answers are searched for."""

    max_new_tokens: int = 16
    """Answers are short: a hypothesis ends here if it has not produced EOS."""
    num_beams: int = 1
    """1: greedy search."""
    length_penalty: float = 1.0
    """Finished beams are ranked by ``log p / length ** length_penalty``."""
    early_stopping: bool = False
    """Stop a question as soon as it has ``num_beams`` finished hypotheses."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RagkitError(f"{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True)
class Hypothesis:
    """A decoded token sequence (ending in EOS unless ``max_new_tokens`` cut it)."""

    tokens: tuple[int, ...]
    log_prob: float
    """Sum of its token log-probs under the distribution searched."""
    score: float
    """What beam search ranks by: ``log_prob / len(tokens) ** length_penalty``."""


@dataclass(frozen=True)
class Answer:
    """RAG-Sequence's pick for one question, and every candidate it chose from."""

    tokens: tuple[int, ...]
    log_prob: float
    """``log p(y|x)``: exact over the passages (thorough), or from the searches' scores only (fast)."""
    candidates: tuple[tuple[tuple[int, ...], float], ...]
    """``(tokens, log p(y|x))`` of each pooled hypothesis, in the order they were found."""


class _Rows(Protocol):
    """The model side of a search over ``G`` groups of hypotheses (rows ``g * n + j``, ``n`` per group)."""

    def first(self) -> Tensor:
        """Next-token log-probs ``(G, V)`` before any token, one row per group."""

    def next(self, tokens: Tensor) -> Tensor:
        """Feed each hypothesis its last token ``(H,)``; next-token log-probs ``(H, V)``."""

    def select(self, rows: Tensor) -> None:
        """Keep hypotheses ``rows`` ``(H',)`` (indices may repeat)."""


class _GeneratorRows:
    """Every generator row is a group of its own: a question with one passage."""

    def __init__(self, generator: Generator, inputs: ReaderInputs) -> None:
        self.generator = generator
        self.state, self._first = generator.start(inputs)

    def first(self) -> Tensor:
        return self._first

    def next(self, tokens: Tensor) -> Tensor:
        return self.generator.step(self.state, tokens)

    def select(self, rows: Tensor) -> None:
        self.state.select(rows)


class _MarginalRows:
    """RAG-Token: a hypothesis is the ``K`` generator rows of its question's passages, all fed its tokens."""

    def __init__(self, generator: Generator, inputs: ReaderInputs, doc_scores: Tensor) -> None:
        self.generator = generator
        self.passages = doc_scores.shape[1]
        self.prior = passage_log_probs(doc_scores).to(generator.device)  # (G, K): log p(z|x) per hypothesis
        self.state, first = generator.start(inputs)  # first: (G * K, V)
        self._first = next_token_log_probs(self.prior, per_passage(first, self.passages))  # (G, V)

    def first(self) -> Tensor:
        return self._first

    def next(self, tokens: Tensor) -> Tensor:
        step = self.generator.step(self.state, tokens.repeat_interleave(self.passages))  # (H * K, V)
        return next_token_log_probs(self.prior, per_passage(step, self.passages))  # (H, V)

    def select(self, rows: Tensor) -> None:
        self.prior = self.prior[rows]
        offsets = torch.arange(self.passages, device=rows.device)
        self.state.select((rows[:, None] * self.passages + offsets).reshape(-1))  # (H' * K,)


def _normalized(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / (max(length, 1) ** length_penalty)


def _greedy(rows: _Rows, options: DecodingOptions, stops: Sequence[int], pad: int) -> list[list[Hypothesis]]:
    log_probs = rows.first()  # (G, V)
    groups = log_probs.shape[0]
    stop_ids = torch.tensor(list(stops), device=log_probs.device)
    done = torch.zeros(groups, dtype=torch.bool, device=log_probs.device)
    tokens: list[Tensor] = []
    token_log_probs: list[Tensor] = []
    for step in range(options.max_new_tokens):
        if step:
            log_probs = rows.next(tokens[-1])
        best = log_probs.argmax(dim=-1)  # (G,)
        picked = log_probs.gather(1, best[:, None]).squeeze(1)
        tokens.append(best.masked_fill(done, pad))  # a finished row is fed padding
        token_log_probs.append(picked.masked_fill(done, 0.0))
        done = done | torch.isin(best, stop_ids)
        if bool(done.all()):
            break
    ids = torch.stack(tokens, dim=1).tolist()  # (G, steps)
    totals = torch.stack(token_log_probs, dim=1).sum(dim=1).tolist()  # (G,)
    hypotheses = []
    for row, total in zip(ids, totals):
        length = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        hypotheses.append([Hypothesis(tuple(row[:length]), total, _normalized(total, length, options.length_penalty))])
    return hypotheses


def _beam_search(rows: _Rows, options: DecodingOptions, stops: Sequence[int]) -> list[list[Hypothesis]]:
    beams = options.num_beams
    first = rows.first()  # (G, V)
    groups, vocab = first.shape
    device = first.device
    stop_ids = torch.tensor(list(stops), device=device)
    rows.select(torch.arange(groups, device=device).repeat_interleave(beams))
    log_probs = first.repeat_interleave(beams, dim=0)  # (G * n, V)
    # The n beams start identical: only the first may expand, or the same tokens would fill every beam.
    running = torch.full((groups, beams), -1e9, device=device)
    running[:, 0] = 0.0
    sequences = torch.zeros((groups, beams, 0), dtype=torch.long, device=device)  # (G, n, t)
    finished: list[list[Hypothesis]] = [[] for _ in range(groups)]
    closed = [False] * groups
    for step in range(options.max_new_tokens):
        if step:
            log_probs = rows.next(sequences[:, :, -1].reshape(-1))
        length = step + 1
        totals = (running[:, :, None] + log_probs.view(groups, beams, vocab)).view(groups, beams * vocab)
        top, index = totals.topk(2 * beams, dim=1)  # (G, 2n): enough to keep n running beams past EOS
        source, token = index // vocab, index % vocab  # (G, 2n)
        ends = torch.isin(token, stop_ids) | (length == options.max_new_tokens)
        candidates = torch.cat([sequences.gather(1, source[:, :, None].expand(-1, -1, step)), token[:, :, None]], dim=2)
        top_list, ends_list = top.tolist(), ends.tolist()
        for group in range(groups):
            if closed[group]:
                continue
            for rank in range(beams):  # only the best n candidates may finish; the rest are spares
                if ends_list[group][rank]:
                    total = top_list[group][rank]
                    score = _normalized(total, length, options.length_penalty)
                    _keep_best(finished[group], Hypothesis(tuple(candidates[group, rank].tolist()), total, score), beams)
        if length == options.max_new_tokens:
            break
        running, keep = top.masked_fill(ends, float("-inf")).topk(beams, dim=1)  # (G, n)
        sequences = candidates.gather(1, keep[:, :, None].expand(-1, -1, length))
        chosen = source.gather(1, keep)  # (G, n): the beam each continues
        rows.select((torch.arange(groups, device=device)[:, None] * beams + chosen).reshape(-1))
        best_running = running[:, 0].tolist()
        for group in range(groups):
            if not closed[group] and len(finished[group]) == beams:
                worst = finished[group][-1].score
                closed[group] = options.early_stopping or _normalized(best_running[group], length, options.length_penalty) <= worst
        if all(closed):
            break
    return finished


def _keep_best(finished: list[Hypothesis], hypothesis: Hypothesis, size: int) -> None:
    """Insert into a best-first list of at most ``size`` hypotheses."""
    if len(finished) == size and hypothesis.score <= finished[-1].score:
        return
    finished.append(hypothesis)
    finished.sort(key=lambda h: -h.score)
    del finished[size:]


def _search(rows: _Rows, generator: Generator, options: DecodingOptions) -> list[list[Hypothesis]]:
    if options.num_beams == 1:
        return _greedy(rows, options, generator.stop_token_ids, generator.pad_token_id)
    return _beam_search(rows, options, generator.stop_token_ids)


@torch.inference_mode()
def generate(generator: Generator, inputs: ReaderInputs, options: DecodingOptions | None = None) -> list[list[Hypothesis]]:
    """Each row decoded on its own: its hypotheses, best first (one with greedy search)."""
    return _search(_GeneratorRows(generator, inputs), generator, options or DecodingOptions())


@torch.inference_mode()
def rag_token_decode(
    generator: Generator, inputs: ReaderInputs, doc_scores: Tensor, options: DecodingOptions | None = None
) -> list[Hypothesis]:
    """RAG-Token: per question (``doc_scores`` ``(B, K)``, ``inputs`` ``B * K`` rows) the best hypothesis.

    Its ``log_prob`` is the RAG-Token ``log p(y|x)``.
    """
    _check_rows(inputs, doc_scores)
    return [found[0] for found in _search(_MarginalRows(generator, inputs, doc_scores), generator, options or DecodingOptions())]


@torch.inference_mode()
def rag_sequence_decode(
    generator: Generator,
    inputs: ReaderInputs,
    doc_scores: Tensor,
    options: DecodingOptions | None = None,
    method: Literal["thorough", "fast"] = "thorough",
    batch_size: int = 64,
) -> list[Answer]:
    """RAG-Sequence: per question (``doc_scores`` ``(B, K)``, ``inputs`` ``B * K`` rows) the best pooled candidate.

    ``batch_size``: rows per forward pass when thorough decoding rescores the candidates.
    """
    if method not in METHODS:
        raise RagkitError(f"method={method!r} is not one of {', '.join(METHODS)}")
    _check_rows(inputs, doc_scores)
    found = _search(_GeneratorRows(generator, inputs), generator, options or DecodingOptions())  # B * K lists
    batch, passages = doc_scores.shape
    prior = passage_log_probs(doc_scores).cpu()  # (B, K)
    pooled: list[dict[tuple[int, ...], dict[int, float]]] = []  # per question: candidate -> {passage: log p(y|x,z)}
    for question in range(batch):
        produced: dict[tuple[int, ...], dict[int, float]] = {}
        for passage in range(passages):
            for hypothesis in found[question * passages + passage]:
                produced.setdefault(hypothesis.tokens, {})[passage] = hypothesis.log_prob
        pooled.append(produced)
    if method == "thorough":
        scores = score_candidates(generator, inputs, [list(p) for p in pooled], passages, batch_size)
    answers = []
    for question, produced in enumerate(pooled):
        if method == "thorough":
            marginal = torch.logsumexp(prior[question][None, :] + scores[question], dim=1)  # (C,)
        else:
            marginal = torch.stack(
                [torch.logsumexp(torch.stack([prior[question, z] + lp for z, lp in by_passage.items()]), dim=0) for by_passage in produced.values()]
            )  # (C,)
        best = int(marginal.argmax())
        candidates = tuple(zip(produced, marginal.tolist()))
        answers.append(Answer(candidates[best][0], candidates[best][1], candidates))
    return answers


@torch.inference_mode()
def score_candidates(
    generator: Generator, inputs: ReaderInputs, candidates: Sequence[Sequence[Sequence[int]]], passages: int, batch_size: int = 64
) -> list[Tensor]:
    """``log p(y|x,z)`` of every candidate of each question under each of its passages: one ``(C_b, K)`` per question.

    ``inputs`` holds ``B * K`` rows (question-major); ``candidates[b]`` are token sequences for question ``b``.
    """
    rows, targets = [], []
    for question, question_candidates in enumerate(candidates):
        for tokens in question_candidates:
            rows.extend(range(question * passages, (question + 1) * passages))
            targets.extend([tokens] * passages)
    totals = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        padded = pad_targets(targets[chunk], generator.pad_token_id)
        chosen = inputs.select(torch.tensor(rows[chunk], device=inputs.input_ids.device))
        totals[chunk] = generator.target_log_probs(chosen, padded).sum(dim=1).cpu()
    scores, start = [], 0
    for question_candidates in candidates:
        count = len(question_candidates) * passages
        scores.append(totals[start : start + count].view(len(question_candidates), passages))  # (C_b, K)
        start += count
    return scores


def _check_rows(inputs: ReaderInputs, doc_scores: Tensor) -> None:
    if doc_scores.dim() != 2 or len(inputs) != doc_scores.numel():
        raise ValueError(f"{len(inputs)} input rows do not match doc_scores {tuple(doc_scores.shape)} (B questions x K passages)")

