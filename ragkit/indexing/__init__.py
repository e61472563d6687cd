"""Dense indexing: encode a corpus with a dual encoder, search it with FAISS, version and update the index.

``encode`` (the one place passages and queries are encoded), ``faiss_index`` (a small FAISS wrapper),
``search`` (the dense searcher and TREC runs), ``versions`` (immutable versions, updates, rollback) and
``stage`` (``ragkit index``).
"""
