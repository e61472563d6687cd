"""The dense retriever: a dual encoder trained with in-batch contrastive losses.

- :mod:`~ragkit.retriever.encoder`: :class:`BiEncoder` (query and passage towers, shared or separate;
  mean or CLS pooling; optional L2 normalisation), its :class:`RetrieverSpec`, and the tokenisation of
  queries and ``title [SEP] text`` passages.
- :mod:`~ragkit.retriever.losses`: :class:`ContrastiveLoss`, one family covering DPR's negative
  log-likelihood, GTE's bidirectional partition and GISTEmbed's guided false-negative filtering.
- :mod:`~ragkit.retriever.data`: mined examples -> grouped batches.
- :mod:`~ragkit.retriever.gradcache`, :mod:`~ragkit.retriever.distributed`,
  :mod:`~ragkit.retriever.negative_cache`: large batches on little memory, several processes, cached
  negatives (a package: the store, Gumbel-Max sampling, masks, the sharded draw, the estimator, the step).
- :mod:`~ragkit.retriever.trainer`: the training stage itself (building, the loop, the artifact), with
  :mod:`~ragkit.retriever.checkpoints` (save, resume, random state), :mod:`~ragkit.retriever.guide`
  (GISTEmbed's frozen guide) and :mod:`~ragkit.retriever.dev_evaluation` (dev metrics during training).

Nothing is imported here, so loading one submodule does not pull in transformers.
"""
