"""``ragkit serve``: retrieval and answers over HTTP from a versioned index, micro-batched, hot-swapped.

* :mod:`.app`: the FastAPI routes and how the server starts (:func:`~ragkit.serving.app.run`);
* :mod:`.batcher`: concurrent requests -> batches answered by one call in a worker thread;
* :mod:`.engine`: one batch -> one retrieval (or reader) call per kind of request, on one version;
* :mod:`.holder`: the served index version, checked before it is served and swapped without stopping;
* :mod:`.limits`: typed request bodies with bounds, the body-size cap, errors as JSON.
"""
