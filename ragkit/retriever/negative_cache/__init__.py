"""Negative cache: passages from earlier steps as extra negatives, drawn by Gumbel-Max sampling.

Reference: Lindgren, Reddi, Guo, Kumar, "Efficient Training of Retrieval Models using Negative Cache",
NeurIPS 2021 (https://openreview.net/forum?id=824xC-SgWgU).

The softmax cross-entropy of a query against its batch *plus* ``N`` cached passages has a gradient that
touches every cached passage's score, which would mean ``N`` passage-tower passes per step. The cache
keeps, for ``N`` passages, the embedding computed when the passage was last encoded (stale by now) and
its tokens. Each step draws, per query, cached passages from the softmax over their stale scores,
re-encodes only those with the live encoder, and uses an estimator whose gradient equals the full
cross-entropy gradient in expectation (exactly so while the cached embeddings are current). Cost per step:
``O(batch)`` passage encodings and one ``(Q, N)`` score matrix, instead of ``O(N)`` encodings.

The estimator (:func:`~.estimator.cache_loss`). For query ``i`` let ``K`` be the in-batch passages (fresh scores
``s_k``, its positive ``p`` among them) and ``C`` the cached passages it may use (scores ``s_c``).
Cross-entropy ``L = -s_p + log(sum_K exp s_k + sum_C exp s_c)`` has gradient::

    dL = -ds_p + sum_K pi_k ds_k + Pi_C E_{c ~ q}[ds_c]

with ``pi`` the softmax over ``K u C``, ``Pi_C = sum_C pi_c`` and ``q(c) = exp s_c / sum_C exp s_c``. The
training loss::

    L^ = -s_p + sum_K sg(pi_k) s_k + sg(Pi_C) * mean_s s_{c_s},   c_1..c_S ~ q (Gumbel-Max, stale scores)

with ``s_{c_s}`` scored from the *re-encoded* embedding has ``E[dL^] = dL``. With ``K = {p}`` it is the
paper's ``(1 - p_pos) (s_c - s_pos)`` (the authors' ``negative_cache/losses.py``,
``CacheClassificationLoss``). Drawing ``j`` from the whole softmax and using ``-s_p + s_j`` is unbiased
too; ``L^`` is that estimator with the in-batch outcomes averaged out exactly (their scores are fresh and
already computed), so only the cache part is sampled and the variance is lower.

One training step, single process::

    draw = cache.draw(query.detach(), generator=g, temperature=t,
                      excluded_ids=positive_ids, batch_ids=batch_passage_ids)
    drawn = model(**draw.inputs(), tower="passage")                  # (B * S, D), with gradient
    out = cache_loss(query, passage, drawn, draw.lse, draw.valid, temperature=t)
    out.loss.backward()
    refresh_drawn(cache, draw, drawn)                                # drawn items get fresh embeddings
    cache.add(passage.detach(), passage_ids, **passage_tokens)       # input_ids, attention_mask, token_type_ids

Under ``torch.distributed`` every rank holds one shard of the cache; :func:`~.sharded.distributed_draw` replaces
``cache.draw`` and returns the same :class:`~.store.CacheDraw` for the rank's local queries, drawn exactly from
the softmax over the union of all shards (see :func:`~.sampling.sharded_gumbel_max_sample`). The caller then
gathers ``drawn``, ``draw.lse`` and ``draw.valid`` over ranks like the other representations and
computes the global loss.

Where each part lives:

- :mod:`~ragkit.retriever.negative_cache.store`: :class:`~.store.NegativeCache`, the fixed-capacity store
  of embeddings and tokens (add, refresh, score, draw, checkpoint), and :class:`~.store.CacheDraw`.
- :mod:`~ragkit.retriever.negative_cache.sampling`: Gumbel-Max sampling, in one tensor and over shards.
- :mod:`~ragkit.retriever.negative_cache.masks`: which cache entries a query may not use.
- :mod:`~ragkit.retriever.negative_cache.sharded`: the cache sharded one shard per rank
  (:func:`~.sharded.distributed_draw`, :func:`~.sharded.refresh_drawn`).
- :mod:`~ragkit.retriever.negative_cache.estimator`: :func:`~.estimator.cache_loss` and
  :func:`~.estimator.staleness`.
- :mod:`~ragkit.retriever.negative_cache.step`: :class:`~.step.NegativeCacheStep`, the training step that
  puts these together (plain or through the gradient cache).

Nothing is imported here; import from the submodule that holds a name.
"""
