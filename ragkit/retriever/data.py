"""Training data for the dual encoder: mined examples -> (question, positive, hard negatives) -> batches.

Three pieces, each with one job:

* Passages are read by id through :class:`ragkit.evaluation.PassageLookup`, which takes rows from the
  ingest artifact's memory-mapped ``passages`` dataset (its id -> row map is built once), so the corpus
  is never copied into Python objects.
* :class:`RetrievalExamples` is the map-style dataset. Item ``i`` of epoch ``e`` is the question, one
  positive and ``N`` hard negatives. Across epochs the positives and the mined negatives *rotate*: epoch
  ``e`` takes the positive ``e mod P`` and the window of ``N`` mined negatives starting at ``e * N``
  (wrapping), so a long mined list is used up before any negative repeats; ``negative_offset`` drops the
  first mined ranks (the likeliest unlabelled positives) before that. A list shorter than ``N`` is
  padded with the example's random negatives from the mine artifact, then with corpus passages drawn
  with a generator seeded by ``(seed, epoch, i)``: the same item is the same on every run and rank.
  Each item also carries the passages mining found to contain its answer (``answer_passage_ids``; an
  artifact mined before that column existed gives none), so a negative cache can keep them out.
* :class:`ResumableBatchSampler` yields the local share of each *global* batch: a seeded permutation
  per epoch, cut into global batches (the last partial one dropped so every rank steps the same number
  of times), each split into ``world_size`` contiguous shards in rank order. Gathering representations
  in rank order therefore rebuilds the global batch a single process would have seen. It can start at
  any batch index of an epoch, which is what resuming from a checkpoint needs.

:class:`BatchCollator` tokenises a list of items into the layout the contrastive loss expects: queries
``(B, Lq)`` and passages ``(B * G, Lp)`` with ``G = 1 + N``, where row ``i * G`` is query ``i``'s positive
and rows ``i * G + 1 .. i * G + N`` its hard negatives. Passages go to the tokenizer as a text pair
``(title, text)``, i.e. ``[CLS] title [SEP] text [SEP]`` as DPR does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import RagkitError
from ..evaluation import PassageLookup
from .distributed import shard_bounds
from .encoder import tokenize_passages, tokenize_queries


@dataclasses.dataclass
class TrainItem:
    """One training example as the loss sees it in a given epoch."""

    query_id: str
    question: str
    positive_id: str
    negative_ids: list[str]
    all_positive_ids: list[str]  # every positive of the question, e.g. to keep them out of cached negatives
    answer_passage_ids: list[str] = dataclasses.field(default_factory=list)  # passages known to hold an answer


class RetrievalExamples(Dataset):
    """Mined examples with per-epoch rotation of positives and hard negatives (see module docstring).

    Examples without any positive passage cannot train a contrastive loss and are skipped;
    ``skipped`` counts them.
    """

    def __init__(
        self,
        examples: Any,
        passages: PassageLookup,
        hard_negatives: int,
        seed: int = 0,
        negative_offset: int = 0,
    ) -> None:
        if hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")
        if negative_offset < 0:
            raise ValueError(f"negative_offset must be >= 0, got {negative_offset}")
        self.passages = passages
        self.hard_negatives = hard_negatives
        self.seed = seed
        self.epoch = 0
        columns = examples.column_names
        random_ids = examples["random_negative_ids"] if "random_negative_ids" in columns else None
        answer_ids = examples["answer_passage_ids"] if "answer_passage_ids" in columns else None
        self.query_ids: list[str] = []
        self.questions: list[str] = []
        self.positives: list[list[str]] = []
        self.mined: list[list[str]] = []
        self.randoms: list[list[str]] = []
        self.answer_passages: list[list[str]] = []
        self.skipped = 0
        for row, (qid, question, positives, negatives) in enumerate(
            zip(examples["id"], examples["question"], examples["positive_ids"], examples["hard_negative_ids"])
        ):
            if not positives:
                self.skipped += 1
                continue
            excluded = set(positives)
            self.query_ids.append(qid)
            self.questions.append(question)
            self.positives.append(list(positives))
            self.mined.append(list(_unique(n for n in negatives if n not in excluded))[negative_offset:])
            extra = random_ids[row] if random_ids is not None else []
            self.randoms.append(list(_unique(n for n in extra if n not in excluded)))
            self.answer_passages.append(list(_unique(answer_ids[row] or [])) if answer_ids is not None else [])

    def max_known(self) -> int:
        """The most passages labelled relevant to one question (positives + answer passages): the width
        every process pads its ``known_rows`` to, so they can be gathered."""
        return max((len(set(p) | set(a)) for p, a in zip(self.positives, self.answer_passages)), default=1)

    def set_epoch(self, epoch: int) -> None:
        """Select which positive and which window of negatives each item uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> TrainItem:
        positives = self.positives[index]
        positive = positives[self.epoch % len(positives)]
        return TrainItem(self.query_ids[index], self.questions[index], positive, self.negatives(index), list(positives),
                         list(self.answer_passages[index]))

    def negatives(self, index: int) -> list[str]:
        """The ``N`` hard negatives of item ``index`` in the current epoch."""
        n = self.hard_negatives
        if n == 0:
            return []
        mined = self.mined[index]
        if len(mined) >= n:
            start = (self.epoch * n) % len(mined)
            return [mined[(start + j) % len(mined)] for j in range(n)]
        chosen = list(mined)
        taken = set(chosen) | set(self.positives[index]) | set(self.answer_passages[index])
        for pid in self.randoms[index]:
            if len(chosen) == n:
                return chosen
            if pid not in taken:
                chosen.append(pid)
                taken.add(pid)
        return chosen + self._corpus_draws(index, n - len(chosen), taken)

    def _corpus_draws(self, index: int, count: int, taken: set[str]) -> list[str]:
        if count == 0:
            return []
        if len(self.passages) - len(taken) < count:
            raise RagkitError(
                f"{self.passages.source}: only {len(self.passages)} passages, too few for {self.hard_negatives} "
                f"negatives per question (lower --hard-negatives)"
            )
        rng = np.random.default_rng([self.seed, self.epoch, index])
        drawn: list[str] = []
        while len(drawn) < count:
            pid = self.passages.ids_at([int(rng.integers(len(self.passages)))])[0]
            if pid not in taken:
                drawn.append(pid)
                taken.add(pid)
        return drawn


def _unique(ids: Any) -> Iterator[str]:
    seen: set[str] = set()
    for pid in ids:
        if pid not in seen:
            seen.add(pid)
            yield pid


class ResumableBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch, deterministic in ``(seed, epoch)`` and startable mid-epoch."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.shard = shard_bounds(global_batch_size, rank, world_size)
        if num_examples < global_batch_size:
            raise RagkitError(
                f"only {num_examples} training examples, fewer than batch_size={global_batch_size} "
                f"(lower --batch-size)"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on."""
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch()):
            start = batch * self.global_batch_size
            yield order[start : start + self.global_batch_size][self.shard]


@dataclasses.dataclass
class Batch:
    """Tokenised inputs plus the raw texts and ids (a guide model tokenises the texts itself)."""

    query: dict[str, torch.Tensor]  # input_ids / attention_mask: (B, Lq)
    passage: dict[str, torch.Tensor]  # input_ids / attention_mask: (B * G, Lp)
    query_ids: list[str]
    questions: list[str]
    passage_ids: list[str]  # (B * G), the loss's layout
    passage_rows: list[int]  # (B * G), rows in the passages dataset: integer ids for caches
    positive_rows: list[list[int]]  # (B, P_i), rows of every positive of each question
    titles: list[str]
    texts: list[str]
    answer_rows: list[list[int]] = dataclasses.field(default_factory=list)  # (B, A_i) rows holding an answer; [] if unknown

    @property
    def size(self) -> int:
        return len(self.query_ids)

    def labels(self, width: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The loss's ``passage_rows`` ``(B * G,)`` and ``known_rows`` ``(B, width)``: each question's
        positives and answer passages, as corpus rows padded with -1."""
        known = torch.full((self.size, width), -1, dtype=torch.long)
        for i, rows in enumerate(self.positive_rows):
            listed = list(dict.fromkeys(rows + (self.answer_rows[i] if self.answer_rows else [])))
            if len(listed) > width:
                raise ValueError(f"question {self.query_ids[i]} has {len(listed)} known passages, more than width={width}")
            known[i, : len(listed)] = torch.tensor(listed, dtype=torch.long)
        return {"passage_rows": torch.tensor(self.passage_rows, dtype=torch.long, device=device), "known_rows": known.to(device)}


class BatchCollator:
    """Items -> :class:`Batch`, reading passage texts by id and padding to the longest row."""

    def __init__(self, tokenizer: Any, passages: PassageLookup, query_max_length: int, passage_max_length: int) -> None:
        self.tokenizer = tokenizer
        self.passages = passages
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length

    def __call__(self, items: list[TrainItem]) -> Batch:
        questions = [item.question for item in items]
        passage_ids = [pid for item in items for pid in (item.positive_id, *item.negative_ids)]
        rows = self.passages.rows(passage_ids, "training examples")
        titles, texts = self.passages.titles_at(rows), self.passages.texts_at(rows)
        return Batch(
            query=tokenize_queries(self.tokenizer, questions, self.query_max_length),
            passage=tokenize_passages(self.tokenizer, titles, texts, self.passage_max_length),
            query_ids=[item.query_id for item in items],
            questions=questions,
            passage_ids=passage_ids,
            passage_rows=rows,
            positive_rows=[self.passages.rows(item.all_positive_ids, "training examples") for item in items],
            titles=titles,
            texts=texts,
            answer_rows=[self.passages.rows(item.answer_passage_ids, "training examples") for item in items],
        )

