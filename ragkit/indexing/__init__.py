"""Dense retrieval over passage indexes, and hybrid retrieval that fuses runs.

``encode`` (the one place passages and queries are encoded), ``shards`` (sharded, resumable encoding),
``fingerprint`` (which encoder made an index), ``faiss_index`` (a small FAISS wrapper), ``search`` (the dense
searcher and TREC runs), ``versions`` (immutable versions, updates, rollback), ``stage`` (``ragkit index``),
``fusion`` and ``hybrid`` (``ragkit hybrid``).
"""
