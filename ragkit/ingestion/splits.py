"""Question splits: the split a file's name announces, ids within a split, and a dev split carved by document."""

from __future__ import annotations

import collections
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import RagkitError

if TYPE_CHECKING:
    from .sources import Question

_SPLIT_IN_NAME = re.compile(r"(?<![a-z])(train|dev|test|validation)(?![a-z])")
SPLIT_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


def infer_split(path: str | Path) -> str:
    """The split a question file's name announces (train, dev, test, validation); 'train' otherwise."""
    match = _SPLIT_IN_NAME.search(Path(path).name.lower())
    return match.group(1) if match else "train"


def carve_dev(question_documents: Sequence[Sequence[str]], fraction: float, seed: int) -> list[bool]:
    """Choose dev questions so that no dev question shares a document with a train question.

    Questions that share a document (directly or through a chain of others) form one group, and whole
    groups move to dev, in an order shuffled by ``seed``, while that brings the dev size closer to
    ``fraction`` of all questions. Returns one flag per question: True for dev.
    """
    parent = list(range(len(question_documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, documents in enumerate(question_documents):
        for doc in documents:
            j = first_with.setdefault(doc, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(question_documents)):
        groups[root(i)].append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = fraction * len(question_documents)
    dev = [False] * len(question_documents)
    size = 0
    for members in order:
        if abs(size + len(members) - target) < abs(size - target):
            size += len(members)
            for i in members:
                dev[i] = True
    return dev


def by_split(questions: list[Question]) -> dict[str, list[Question]]:
    """Questions grouped by split (in input order), missing ids filled in as ``{split}-{n}``."""
    splits: dict[str, list[Question]] = {}
    for q in questions:
        splits.setdefault(q.split, []).append(q)
    for split, members in splits.items():
        if not SPLIT_NAME.fullmatch(split):
            raise RagkitError(f"{members[0].where}: split name {split!r} must be letters, digits, '_', '-' or '.' "
                              "(rename it)")
        ids: set[str] = set()
        for n, q in enumerate(members):
            if q.id is None:
                q.id = f"{split}-{n}"
            if q.id in ids:
                raise RagkitError(f"{q.where}: duplicate question id '{q.id}' in split '{split}' "
                                  "(ids must be unique within a split)")
            ids.add(q.id)
    return splits


def carve_dev_split(splits: dict[str, list[Question]], fraction: float, seed: int, inputs: Sequence[str],
                    name: str = "dev", flag: str = "--dev-fraction") -> None:
    """Move ``fraction`` of the train questions into split ``name``, grouped by document (see :func:`carve_dev`)."""
    if name in splits:
        raise RagkitError(f"{splits[name][0].where}: the inputs already hold a '{name}' split; drop {flag} or "
                          f"the {name} questions")
    train = splits.get("train", [])
    flags = carve_dev([q.documents() for q in train], fraction, seed)
    carved = [q for q, chosen in zip(train, flags) if chosen]
    if not carved or len(carved) == len(train):
        raise RagkitError(f"{flag} {fraction} leaves {'no' if not carved else 'every'} train question for {name} "
                          f"({len(train)} train questions from {', '.join(inputs)}); adjust {flag}")
    splits["train"] = [q for q, chosen in zip(train, flags) if not chosen]
    splits[name] = carved
