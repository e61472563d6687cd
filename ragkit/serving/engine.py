"""One batch of requests -> one retrieval (and one reader) call per kind of request, on one index version.

:class:`BatchEngine` is the ``process`` of the :class:`~ragkit.serving.batcher.MicroBatcher`: it takes the
served version once for the whole batch (so every response of a batch reports, and used, the same
version), groups the retrieve requests by mode and the answer requests by ``(n_docs, decoding)``, and
makes one :meth:`~ragkit.indexing.retrieval.PassageRetriever.retrieve` (or reader) call per group with all
of its questions. A group asks for its largest ``k``; each request keeps the first ``k`` of its own list,
which is the top ``k`` of every mode (dense and BM25 rank by score, and a hybrid fuses fixed-depth lists).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

from ..errors import RagkitError
from .batcher import Job
from .holder import Served, VersionHolder


class NoReader(RagkitError):
    """An answer was asked of a server started without a reader."""


def passage_rows(found: Any, k: int) -> list[dict[str, Any]]:
    """The first ``k`` passages of a :class:`~ragkit.indexing.retrieval.Retrieved` as JSON rows."""
    return [{"id": pid, "title": title, "text": text, "score": float(score)}
            for pid, title, text, score in zip(found.passage_ids[:k], found.titles[:k], found.texts[:k], found.scores[:k])]


class BatchEngine:
    """Runs a batch of jobs against the held version (see the module docstring)."""

    def __init__(self, holder: VersionHolder, reader: Any = None) -> None:
        self.holder = holder
        self.reader = reader

    def __call__(self, jobs: Sequence[Job]) -> list[Any]:
        served = self.holder.acquire()
        try:
            results: list[Any] = [None] * len(jobs)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i, job in enumerate(jobs):
                request = job.request
                key = ("retrieve", request.retrieval) if job.kind == "retrieve" else ("answer", request.n_docs, request.decoding)
                groups[key].append(i)
            for key, members in groups.items():
                start = time.perf_counter()
                try:
                    outputs = self._run_group(served, key, [jobs[i].request for i in members])
                except RagkitError as exc:
                    outputs = [exc] * len(members)
                compute_ms = (time.perf_counter() - start) * 1000
                for i, output in zip(members, outputs):
                    if isinstance(output, dict):
                        output.update(version=served.name, compute_ms=compute_ms, batch_size=len(jobs))
                    results[i] = output
            return results
        finally:
            self.holder.release(served)

    def _run_group(self, served: Served, key: tuple, requests: list[Any]) -> list[Any]:
        """Outputs of one group's requests: dicts, or the RagkitError of a request that cannot be met."""
        size = (lambda r: r.k) if key[0] == "retrieve" else (lambda r: r.n_docs)
        outputs: list[Any] = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            if size(request) > served.passages:
                outputs[i] = RagkitError(f"asked for {size(request)} passages, index version {served.name} holds "
                                         f"{served.passages} (ask for fewer)")
            else:
                valid.append(i)
        if not valid:
            return outputs
        questions = [requests[i].question for i in valid]
        if key[0] == "retrieve":
            found = served.retriever(key[1]).retrieve(questions, max(requests[i].k for i in valid))
            for i, result in zip(valid, found):
                outputs[i] = {"passages": passage_rows(result, requests[i].k)}
        else:
            if self.reader is None:
                raise NoReader("no reader loaded: start the server with --reader to answer questions")
            predictions = self.reader.answer(questions, served.retriever("dense"), n_docs=key[1], decoding=key[2])
            for i, prediction in zip(valid, predictions):
                log_prob = None if prediction.log_prob is None else float(prediction.log_prob)
                outputs[i] = {"answer": prediction.answer, "log_prob": log_prob,
                              "passages": [dict(p) for p in prediction.passages]}
        return outputs
