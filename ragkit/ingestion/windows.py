"""Passage windows: documents cut DPR-style into windows of words, and the ids the windows get."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

_NON_SPACE = re.compile(r"\S")

def window_ranges(text: str, window: int, stride: int) -> list[tuple[int, int]]:
    """Character ranges ``(start, end)`` of the word windows of ``text``.

    A window holds ``window`` words and windows start every ``stride`` words; the last one ends at the
    last word (it may be shorter). ``window == 0`` or a text of at most ``window`` words gives one range,
    the text without its surrounding white space. A text without words gives ``[(0, 0)]``.
    """
    first = _NON_SPACE.search(text)
    if first is None:
        return [(0, 0)]
    if window == 0:
        return [(first.start(), len(text.rstrip()))]
    # Regexes step over whole windows in C; a match object per word would cost most of the ingest time.
    span, step = _window_patterns(window, stride)
    ranges = []
    start = first.start()
    while True:
        end = span.match(text, start).end()
        ranges.append((start, end))
        if _NON_SPACE.search(text, end) is None:
            return ranges
        start = step.match(text, start).end()


@functools.lru_cache(maxsize=8)
def _window_patterns(window: int, stride: int) -> tuple[re.Pattern, re.Pattern]:
    """From the first word of a window: up to ``window`` words, and ``stride`` words with the space after."""
    return re.compile(rf"\S+(?:\s+\S+){{0,{window - 1}}}"), re.compile(rf"(?:\S+\s+){{{stride}}}")


def passage_ids(doc_id: str, count: int) -> list[str]:
    """Ids of a document's ``count`` windows: the document id itself when there is one window."""
    return [doc_id] if count == 1 else [f"{doc_id}#{k}" for k in range(count)]


class Windows(NamedTuple):
    """The windows of a document some question refers to."""

    ids: list[str]
    ranges: list[tuple[int, int]]
    texts: list[str] | None
    """Kept only for a cut gold passage, to find the windows that hold an answer."""
