"""The reader of retrieval-augmented generation (Lewis et al. 2020, arXiv:2005.11401).

A question retrieves ``K`` passages with scores ``q.d``; a generator reads each passage with the question;
the answer's probability marginalises over the passages, so the loss trains the generator and, through
``log p(z|x) = log_softmax(q.d)``, the query encoder (the passage vectors of the index stay fixed).

* :mod:`.marginalize`: the RAG-Sequence and RAG-Token marginals and losses, pure functions of tensors;
* :mod:`.generator`: BART-like seq2seq models and decoder-only causal LMs behind one interface
  (inputs for (question, passage) pairs, per-token log-probs of answers, step-by-step decoding);
* :mod:`.decode`: RAG-Token greedy / beam search over the marginal, RAG-Sequence thorough and fast decoding.
"""
