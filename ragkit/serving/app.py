"""The HTTP server: routes, their JSON, and how the pieces start and stop.

Routes (all JSON, errors ``{"error": message}`` with a 4xx status)::

    GET  /               the question page (static/index.html), ``/?q=...`` asks at once
    GET  /health         status, the served version, versions still in memory, pending requests
    GET  /version        the served version, its encoder fingerprints, the generator's
    POST /retrieve       {question, k, retrieval: dense|bm25|hybrid} -> passages, version, timings
    POST /answer         {question, n_docs, decoding} -> answer, passages, version, timings (needs --reader)
    POST /admin/reload   {version?} -> load and swap to a version (clients on the loopback only)

Requests go through the :class:`~ragkit.serving.batcher.MicroBatcher` to the
:class:`~ragkit.serving.engine.BatchEngine`, which answers each batch from the version the
:class:`~ragkit.serving.holder.VersionHolder` holds. A background task polls the index's ``current``
pointer every ``poll_seconds`` and swaps to a new version when it names one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..config import ServeConfig
from ..errors import RagkitError
from ..indexing.fingerprint import weights_hash
from .batcher import Busy, Job, MicroBatcher
from .engine import BatchEngine, NoReader
from .holder import VersionHolder, VersionLoader
from .limits import AnswerRequest, BodyLimit, ReloadRequest, RetrieveRequest, error_message

logger = logging.getLogger("ragkit.serve")

PAGE = Path(__file__).parent / "static" / "index.html"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def load_reader(cfg: ServeConfig) -> Any:
    """The reader named by ``--reader``, or None."""
    if cfg.reader is None:
        return None
    from ..reader.rag import RagReader

    return RagReader.load(cfg.reader, index=cfg.index, device=cfg.device, precision=cfg.precision)


def open_holder(cfg: ServeConfig, reader: Any = None) -> VersionHolder:
    """The current version of ``cfg.index`` opened for serving, with the reader's query tower if there is one."""
    loader = VersionLoader(cfg.index, modes=cfg.modes, mine=cfg.mine, alpha=cfg.alpha,
                           query_model=reader.query_model if reader is not None else None, device=cfg.device,
                           precision=cfg.precision, batch_size=cfg.batch_size)
    return VersionHolder(loader)


def describe_generator(reader: Any) -> dict[str, Any] | None:
    """The reader's generator for ``/version``: its source, kind, marginal and the fingerprint of its weights."""
    if reader is None:
        return None
    return {"model": reader.source, "kind": reader.generator.kind, "marginal": reader.marginal,
            "default_decoding": reader.default_decoding,
            "fingerprint": weights_hash(reader.generator.model.config.name_or_path)}


def create_app(cfg: ServeConfig, holder: VersionHolder, reader: Any = None) -> FastAPI:
    """The FastAPI application serving ``holder``'s versions (see the module docstring)."""
    engine = BatchEngine(holder, reader)
    generator = describe_generator(reader)
    batcher = MicroBatcher(engine, max_batch=cfg.max_batch, window=cfg.batch_window_ms / 1000,
                           max_pending=cfg.max_pending)

    async def follow_current() -> None:
        while True:
            await asyncio.sleep(cfg.poll_seconds)
            try:
                await asyncio.to_thread(holder.poll)
            except Exception:  # polling must outlive any one failure
                logger.exception("checking %s for a new version failed", cfg.index)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        poller = asyncio.create_task(follow_current()) if cfg.poll_seconds > 0 else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await batcher.stop()

    app = FastAPI(title="ragkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder, app.state.batcher, app.state.reader = holder, batcher, reader
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": error_message(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RagkitError)
    async def _refused(_: Request, exc: RagkitError) -> JSONResponse:
        status = 503 if isinstance(exc, (Busy, NoReader)) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:  # a fault of the server, not of the request
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc}); see the server log"}, status_code=500)

    async def submit(kind: str, request: Any) -> dict[str, Any]:
        job = Job(kind, request)
        result = await batcher.submit(job)
        done = time.perf_counter()
        result["timings"] = {"queue_ms": round((job.started - job.queued) * 1000, 3),
                             "compute_ms": round(result.pop("compute_ms"), 3),
                             "total_ms": round((done - job.queued) * 1000, 3),
                             "batch_size": result.pop("batch_size")}
        return result

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": holder.current.name, "live_versions": holder.live_versions,
                "pending": batcher.pending, "batches": batcher.batches, "refused": holder.refused}

    @app.get("/version")
    async def version() -> dict[str, Any]:
        served = holder.current
        encoder = served.encoder
        return {"index": str(holder.loader.index), "version": served.name, "passages": served.passages,
                "retrieval": list(served.retrievers),
                "encoder": {"model": encoder.model, "dimension": encoder.dimension, "similarity": encoder.similarity,
                            "query_fingerprint": encoder.query_fingerprint,
                            "passage_fingerprint": encoder.passage_fingerprint},
                "query_encoder": {"model": holder.loader.settings.model,
                                  "query_fingerprint": holder.loader.settings.query_fingerprint},
                "generator": generator,
                "batching": {"max_batch": cfg.max_batch, "window_ms": cfg.batch_window_ms}}

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        return {"question": request.question, "retrieval": request.retrieval, "k": request.k,
                **await submit("retrieve", request)}

    @app.post("/answer")
    async def answer(request: AnswerRequest) -> dict[str, Any]:
        if reader is None:
            raise NoReader("no reader loaded: start the server with --reader to answer questions")
        return {"question": request.question, "n_docs": request.n_docs,
                "decoding": request.decoding or reader.default_decoding, **await submit("answer", request)}

    @app.post("/admin/reload")
    async def reload(request: Request, body: ReloadRequest | None = Body(None)) -> JSONResponse:
        client = request.client.host if request.client else ""
        if client not in LOOPBACK:
            raise HTTPException(403, f"reload is accepted from the loopback interface only, not from {client!r}")
        result = await asyncio.to_thread(holder.reload, body.version if body else None)
        status = 409 if result.error else 200
        payload = dataclasses.asdict(result)
        if result.error:
            payload["error"] = f"version {result.version} refused, still serving {holder.current.name}: {result.error}"
        return JSONResponse({**payload, "serving": holder.current.name}, status_code=status)

    return app


def run(cfg: ServeConfig) -> None:
    """Load the index (and reader) and serve until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # versions served, refused and freed
    reader = load_reader(cfg)
    holder = open_holder(cfg, reader)
    app = create_app(cfg, holder, reader)
    logger.info("serving %s version %s (%s) at http://%s:%d/", cfg.index, holder.current.name,
                ", ".join(holder.current.retrievers), cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
