"""The FAISS wrapper against brute-force inner products, on clustered random vectors."""

from __future__ import annotations

import numpy as np
import pytest

from ragkit.errors import RagkitError
from ragkit.indexing.faiss_index import FaissIndex, build_index

from indexing_data import brute_force


def clustered(n: int, d: int = 16, centers: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(centers, d))
    return (middles[rng.integers(centers, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


PASSAGES = clustered(300)
QUERIES = clustered(20, seed=1)


@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_flat_search_equals_brute_force(similarity):
    labels = np.arange(len(PASSAGES)) * 7 + 3  # labels need not be row numbers
    index, trained = build_index("Flat", PASSAGES, labels, similarity)
    assert trained == 0 and len(index) == len(PASSAGES)
    scores, found = index.search(QUERIES, 25)
    passages, queries = PASSAGES, QUERIES
    if similarity == "cos":
        passages = passages / np.linalg.norm(passages, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows, expected = brute_force(queries, passages, 25)
    np.testing.assert_array_equal(found, labels[rows])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)


def test_hnsw_beam_is_raised_to_k():
    import faiss

    index, _ = build_index("HNSW16", PASSAGES, np.arange(len(PASSAGES)), "dot")
    rows, _ = brute_force(QUERIES, PASSAGES, 60)

    def recall(found):
        return np.mean([len(set(a) & set(b)) / 60 for a, b in zip(found, rows)])

    _, found = index.search(QUERIES, 60, ef_search=8)
    hnsw = faiss.downcast_index(index.index.index).hnsw
    assert hnsw.efSearch == 60 and (found >= 0).all() and recall(found) > 0.9
    hnsw.efSearch = 8  # what FAISS itself would search with
    _, narrow = index.index.search(QUERIES, 60)
    assert recall(narrow) < recall(found)


def test_ivf_trains_on_a_seeded_sample_and_searching_every_list_is_exact():
    index, trained = build_index("IVF8,Flat", PASSAGES, np.arange(len(PASSAGES)), "dot", train_sample=120, seed=5)
    assert trained == 120
    scores, found = index.search(QUERIES, 10, nprobe=100)  # more than the 8 lists: all of them
    rows, expected = brute_force(QUERIES, PASSAGES, 10)
    np.testing.assert_array_equal(found, rows)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    _, one_list = index.search(QUERIES, 10, nprobe=1)
    assert (one_list != rows).any()  # one list of eight misses some neighbours


def test_ivf_pq_builds_and_ranks_close_to_exact():
    passages = clustered(640, d=16, seed=2)
    index, _ = build_index("IVF4,PQ4x4", passages, np.arange(len(passages)), "dot")
    _, found = index.search(QUERIES, 10, nprobe=4)
    rows, _ = brute_force(QUERIES, passages, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, rows)]) > 0.3


def test_removal_by_label_and_kinds_that_cannot_delete():
    for factory in ("Flat", "IVF8,Flat"):
        index, _ = build_index(factory, PASSAGES, np.arange(len(PASSAGES)), "dot")
        rows, _ = brute_force(QUERIES, PASSAGES, 5)
        gone = np.unique(rows[:, 0])
        assert index.remove(gone) and len(index) == len(PASSAGES) - len(gone)
        _, found = index.search(QUERIES, 5, nprobe=8)
        assert not set(found.ravel()) & set(gone)
    hnsw, _ = build_index("HNSW16", PASSAGES, np.arange(len(PASSAGES)), "dot")
    assert not hnsw.remove(np.array([0, 1])) and len(hnsw) == len(PASSAGES)


def test_save_and_load_give_the_same_results(tmp_path):
    index, _ = build_index("IVF8,Flat", PASSAGES, np.arange(len(PASSAGES)), "cos")
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", "cos", "IVF8,Flat")
    for a, b in zip(index.search(QUERIES, 10, nprobe=3), loaded.search(QUERIES, 10, nprobe=3)):
        np.testing.assert_array_equal(a, b)


def test_bad_factories_and_too_few_training_vectors_are_one_line_errors():
    with pytest.raises(RagkitError, match=r"index factory 'IVF12,Blah' .*examples: Flat") as error:
        FaissIndex.create("IVF12,Blah", 16, "dot")
    assert "\n" not in str(error.value)
    with pytest.raises(RagkitError, match="multiple of the number of subquantizers") as error:
        FaissIndex.create("PQ5", 16, "dot")
    with pytest.raises(RagkitError, match=r"cannot train index 'IVF512,Flat' on 300 vectors .*at least as large") as error:
        build_index("IVF512,Flat", PASSAGES, np.arange(len(PASSAGES)), "dot")
    assert "\n" not in str(error.value)
