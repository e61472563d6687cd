"""Answer matching and QA metrics, compatible with DPR and SQuAD.

``has_answer`` is DPR's retrieval criterion (``dpr/data/qa_validation.py``, also pyserini's
``evaluate_dpr_retrieval.py``): the passage *text* and each answer are NFD-normalised, tokenised with
DrQA's ``SimpleTokenizer`` (runs of letters/digits/marks, or any single other non-space character),
lower-cased, and an answer matches when its token sequence occurs contiguously in the passage's. This is
*token* matching: "art" does not match "party", and "U.S." matches "u . s ." token by token. In ``regex``
mode (CuratedTREC) each answer is a case-insensitive regular expression searched in the normalised text.
"Top-k accuracy" everywhere in ragkit means this semantics.

``exact_match`` / ``f1`` are the SQuAD v1.1 evaluation script's definitions (lower-case, strip punctuation
and the articles a/an/the, collapse white space).
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from functools import lru_cache
from typing import Iterable, Literal, Sequence

import regex

# DrQA SimpleTokenizer: a token is a run of letters/numbers/combining marks, or one non-space character.
_ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
_NON_WS = r"[^\p{Z}\p{C}]"
_TOKEN_RE = regex.compile(f"({_ALPHA_NUM})|({_NON_WS})", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)

MatchType = Literal["string", "regex"]


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def answer_tokens(text: str) -> list[str]:
    """DrQA SimpleTokenizer tokens of NFD-normalised ``text``, lower-cased."""
    return [m.group().lower() for m in _TOKEN_RE.finditer(_nfd(text))]


@lru_cache(maxsize=65536)
def _answer_key(answer: str) -> tuple[str, ...]:
    return tuple(answer_tokens(answer))


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False  # an empty answer matches nothing (DPR would match everything)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and tuple(haystack[i : i + n]) == tuple(needle):
            return True
    return False


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> "re.Pattern[str] | None":
    try:
        return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except re.error:
        return None  # DPR treats an invalid pattern as no match


def has_answer(answers: Iterable[str], text: str, match_type: MatchType = "string") -> bool:
    """True when ``text`` contains any of ``answers`` (DPR semantics, see module docstring)."""
    if match_type == "string":
        tokens = answer_tokens(text)
        return any(_contains(tokens, _answer_key(a)) for a in answers)
    if match_type == "regex":
        normalised = _nfd(text)
        for pattern in answers:
            compiled = _compile(pattern)
            if compiled is not None and compiled.search(normalised) is not None:
                return True
        return False
    raise ValueError(f"match_type must be 'string' or 'regex', got {match_type!r}")


def has_answer_tokens(answers: Iterable[str], tokens: Sequence[str]) -> bool:
    """``has_answer`` in string mode for a passage already tokenised with :func:`answer_tokens`."""
    return any(_contains(tokens, _answer_key(a)) for a in answers)


# --- SQuAD v1.1 metrics -------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def _f1_single(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Iterable[str]) -> float:
    """Best token-level F1 of the prediction against any gold answer (SQuAD definition)."""
    golds = list(golds)
    return max((_f1_single(prediction, g) for g in golds), default=0.0)
