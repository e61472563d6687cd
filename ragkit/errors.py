"""The one exception type users see: a single line naming what is wrong, where, and how to fix it."""


class RagkitError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2, no traceback.

    Messages name the file (and line, where there is one) and the fix, e.g.
    ``data/q.jsonl:17: missing field 'question' (set --question-field to the field holding the text)``.
    """


def located(path, line: int | None, message: str) -> RagkitError:
    """``path:line: message`` (``path: message`` when there is no line)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return RagkitError(f"{where}: {message}")
