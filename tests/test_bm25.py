import math
from collections import Counter

import numpy as np
import pytest

from ragkit.bm25 import BM25Index, Tokenizer, TokenizedCorpus, rankings_agree
from ragkit.errors import RagkitError


def zipf_corpus(n_passages: int, n_queries: int, vocab: int = 3000, seed: int = 0) -> tuple[list[str], list[str]]:
    """Passages of 10..120 words drawn from a Zipf-like vocabulary (common words get negative idf)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    passages = [" ".join(words[rng.choice(vocab, size=rng.integers(10, 120), p=p)]) for _ in range(n_passages)]
    queries = [" ".join(words[rng.choice(vocab, size=rng.integers(2, 9), p=p)]) for _ in range(n_queries)]
    return passages, queries


def test_tokenizer_normalises_lowercases_and_splits_words():
    tok = Tokenizer()
    # NFKC folds the "ﬁ" ligature and full-width letters; \w+ drops punctuation, keeps digits.
    assert tok("The ﬁrst ＡＢＣ-test, 2024!") == ["the", "first", "abc", "test", "2024"]
    assert tok("") == []


def test_tokenizer_stopwords_use_the_lucene_english_list():
    tok = Tokenizer(stopwords=True)
    assert tok("The cat is on the mat and it was there") == ["cat", "mat"]
    assert tok.settings()["stopwords"] == "lucene-english"


def test_stemming_needs_pystemmer():
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        with pytest.raises(RagkitError, match="pip install PyStemmer"):
            Tokenizer(stem=True)
    else:
        assert Tokenizer(stem=True)("running cats") == ["run", "cat"]


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4)])
def test_bm25s_robertson_matches_rank_bm25_okapi(k1, b):
    passages, queries = zipf_corpus(2000, 60)
    tok = Tokenizer()
    fast = BM25Index.create("bm25s", tok, "robertson", k1, b, threads=2)
    ref = BM25Index.create("rank-bm25", tok, "robertson", k1, b)
    fast.index(passages)
    ref.index(passages)
    i_fast, s_fast = fast.search(queries, 100)
    i_ref, s_ref = ref.search(queries, 100)
    assert i_fast.shape == i_ref.shape == (60, 100)
    # rank-bm25 multiplies every term weight by (k1 + 1); bm25s does not.
    assert rankings_agree(i_fast, s_fast, i_ref, s_ref / (k1 + 1), atol=1e-4) == []
    assert (i_fast >= 0).sum() > 0.8 * i_fast.size  # most rows are full: the comparison is not vacuous


def test_rankings_agree_detects_a_different_ranking():
    passages, queries = zipf_corpus(300, 10)
    index = BM25Index.create("bm25s", Tokenizer())
    index.index(passages)
    idx, sc = index.search(queries, 20)
    assert rankings_agree(idx, sc, idx, sc) == []
    swapped = idx.copy()
    swapped[3, 0] = next(i for i in range(300) if i not in set(idx[3].tolist()))
    assert rankings_agree(idx, sc, swapped, sc) == [3]
    assert rankings_agree(idx, sc, idx, sc * 1.01) != []


def naive_bm25(docs: list[list[str]], query: list[str], k1: float, b: float, idf_kind: str) -> np.ndarray:
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    df = Counter(t for d in docs for t in set(d))
    scores = np.zeros(n)
    for i, d in enumerate(docs):
        tf = Counter(d)
        for term in query:
            if tf[term] == 0:
                continue
            ratio = (n - df[term] + 0.5) / (df[term] + 0.5)
            idf = max(math.log(ratio), 0.0) if idf_kind == "robertson" else math.log(1 + ratio)
            scores[i] += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(d) / avgdl))
    return scores


@pytest.mark.parametrize("method", ["robertson", "lucene"])
def test_bm25s_scores_equal_the_formula(method):
    passages, queries = zipf_corpus(150, 12, vocab=200, seed=3)
    tok = Tokenizer()
    index = BM25Index.create("bm25s", tok, method, k1=1.2, b=0.6)
    index.index(passages)
    idx, sc = index.search(queries, 150)
    docs = [tok(p) for p in passages]
    for q, query in enumerate(queries):
        expected = naive_bm25(docs, tok(query), 1.2, 0.6, method)
        valid = idx[q] >= 0
        np.testing.assert_allclose(sc[q][valid], expected[idx[q][valid]], rtol=1e-5, atol=1e-6)
        # Every passage with a positive score is returned, and nothing else.
        assert set(idx[q][valid].tolist()) == set(np.flatnonzero(expected > 0).tolist())


def test_search_pads_non_matching_and_orders_ties_by_row():
    # "apple" is in 3 of 7 passages, so its Robertson idf log(4.5 / 3.5) is positive.
    passages = ["apple pie", "banana split", "apple pie", "cherry tart", "apple pie", "date cake", "fig roll"]
    for backend in ("bm25s", "rank-bm25"):
        index = BM25Index.create(backend, Tokenizer())
        index.index(passages)
        idx, sc = index.search(["apple", "zucchini", ""], 10)
        assert idx.shape == (3, 10)
        assert idx[0, :3].tolist() == [0, 2, 4] and (idx[0, 3:] == -1).all()
        assert sc[0, 0] == sc[0, 1] == sc[0, 2] > 0 and (sc[0, 3:] == 0).all()
        assert (idx[1:] == -1).all()


@pytest.mark.parametrize("backend", ["bm25s", "rank-bm25"])
def test_save_and_load_give_the_same_results(tmp_path, backend):
    passages, queries = zipf_corpus(400, 15, seed=7)
    index = BM25Index.create(backend, Tokenizer(stopwords=True), "robertson", 1.3, 0.7)
    index.index(passages)
    index.save(tmp_path / "bm25", {"note": "kept"})
    loaded = BM25Index.load(tmp_path / "bm25")
    config = BM25Index.read_config(tmp_path / "bm25")
    assert config["backend"] == backend and config["note"] == "kept" and config["passages"] == 400
    assert config["tokenizer"]["stopwords"] == "lucene-english"
    assert loaded.settings() == index.settings()
    before, after = index.search(queries, 30), loaded.search(queries, 30)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_tokenized_corpus_round_trip(tmp_path):
    corpus = TokenizedCorpus.build(["a b a", "", "c b"], Tokenizer(), chunk=2)
    assert len(corpus) == 3
    assert [[corpus.terms()[i] for i in ids] for ids in corpus.passage_ids()] == [["a", "b", "a"], [], ["c", "b"]]
    corpus.save(tmp_path)
    again = TokenizedCorpus.load(tmp_path)
    assert again.vocab == corpus.vocab and (again.ids == corpus.ids).all() and (again.offsets == corpus.offsets).all()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(RagkitError, match="only method='robertson'"):
        BM25Index.create("rank-bm25", Tokenizer(), "lucene")
    with pytest.raises(RagkitError, match="backend"):
        BM25Index.create("lucene", Tokenizer())
    with pytest.raises(RagkitError, match="no passages"):
        BM25Index.create("bm25s", Tokenizer()).index([])
    with pytest.raises(RagkitError, match="not a saved BM25 index"):
        BM25Index.load(tmp_path)
