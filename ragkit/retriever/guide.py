"""The guide of GISTEmbed: a frozen model whose embeddings tell the loss which in-batch candidates to drop.

Reference: Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding
Fine-tuning", 2024 (https://arxiv.org/abs/2402.16829). The masking itself is
:class:`~ragkit.retriever.losses.ContrastiveLoss`'s (``guide_margin_strategy``); this module only computes
the guide's embeddings.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .data import Batch
from .encoder import BiEncoder, autocast, load_tokenizer, tokenize_passages, tokenize_queries


class GuideEncoder:
    """A frozen model whose embeddings decide which in-batch candidates the loss drops as false negatives.

    It never receives a gradient. Embeddings are computed in chunks, kept per question id and passage
    row for the whole run (each is encoded once however often it recurs), and handed to the loss, which
    gathers them across processes like the trained representations.
    """

    def __init__(self, name: str, device: torch.device, chunk_size: int, query_max_length: int,
                 passage_max_length: int, autocast_dtype: torch.dtype | None) -> None:
        self.model = BiEncoder.from_pretrained(name).to(device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(name)
        self.device = device
        self.chunk_size = chunk_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.autocast_dtype = autocast_dtype
        self.queries: dict[str, Tensor] = {}
        self.passages: dict[int, Tensor] = {}

    @torch.no_grad()  # not inference_mode: the loss builds its masks from these inside the training graph
    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        query = self._embed(self.queries, batch.query_ids, "query",
                            lambda i: tokenize_queries(self.tokenizer, [batch.questions[j] for j in i], self.query_max_length))
        passage = self._embed(self.passages, batch.passage_rows, "passage",
                              lambda i: tokenize_passages(self.tokenizer, [batch.titles[j] for j in i],
                                                          [batch.texts[j] for j in i], self.passage_max_length))
        return {"guide_query": query, "guide_passage": passage}  # (B, D'), (B * G, D')

    def _embed(self, cache: dict, keys: list, tower: str, tokenize: Callable[[list[int]], dict[str, Tensor]]) -> Tensor:
        missing = list({key: i for i, key in enumerate(keys) if key not in cache}.values())
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            inputs = {k: v.to(self.device) for k, v in tokenize(chunk).items()}
            with autocast(self.device, self.autocast_dtype):
                vectors = self.model(**inputs, tower=tower).float()  # (c, D')
            for i, vector in zip(chunk, vectors.cpu()):
                cache[keys[i]] = vector
        return torch.stack([cache[key] for key in keys]).to(self.device)
