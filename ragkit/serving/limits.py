"""What a request may hold: typed bodies with bounds, a cap on body size, and 4xx errors as JSON.

Bodies are pydantic models in strict mode (``"k": "5"`` is refused, not converted) that forbid unknown
fields. A body larger than ``max_body_bytes`` is refused with 413 before it is read whole (its declared
``Content-Length``, or the bytes counted as they arrive). Every refusal is ``{"error": message}`` with a
4xx status; the message names the field and the bound.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from ..indexing.retrieval import MODES
from ..reader.config import DECODINGS

MAX_QUESTION_CHARS = 1000
MAX_PASSAGES = 50
"""The most passages a request may ask for (k, n_docs); a version holding fewer bounds it further."""
Retrieval = Literal[MODES]
Decoding = Literal[DECODINGS]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the question is blank")
        return value


class RetrieveRequest(_Request):
    """``POST /retrieve``: the top ``k`` passages of a question."""

    k: int = Field(10, ge=1, le=MAX_PASSAGES)
    retrieval: Retrieval = "dense"


class AnswerRequest(_Request):
    """``POST /answer``: an answer read from the top ``n_docs`` passages."""

    n_docs: int = Field(5, ge=1, le=MAX_PASSAGES)
    decoding: Decoding | None = None
    """None: the reader's own default (greedy for RAG-Token, thorough for RAG-Sequence)."""


class ReloadRequest(BaseModel):
    """``POST /admin/reload``: a version to serve (default: the ``current`` pointer's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: str | None = Field(None, min_length=1, max_length=64, pattern=r"^v[0-9]+$")


def error_message(errors: list[dict[str, Any]]) -> str:
    """One line from pydantic's validation errors: ``field: problem; field: problem``."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
            where = "body"
        parts.append(f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


def json_response(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": message}).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, declared (answered at once) or counted
    as it arrives (raised as an HTTP error, which the app's handler turns into the JSON refusal)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, headers, body = json_response(413, self.message)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted_receive, send)

    @property
    def message(self) -> str:
        return f"request body over {self.max_bytes} bytes"
