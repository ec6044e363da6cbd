"""The body size limit of both HTTP APIs: the portal and a data centre's agent API.

Flask refuses a body larger than ``MAX_CONTENT_LENGTH`` only when a view
reads it, that is after authentication and whatever the view did first (for
the portal, an RPC to the registry). Here a body is judged before any of
that: by its declared length, for the cost of a header; a chunked body, which
declares none, is read up to one byte past the limit (no more than the view
would have read) and refused if that byte is there. Werkzeug alone would cut
such a body at the limit without a word, and the view would parse a
truncated form or JSON document. Either way the answer is the one table's
413 ``body_too_large`` (``services/common/http_errors.py``).
"""

from __future__ import annotations

import io

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

READ_SIZE = 64 * 1024


def limit_body_size(app: Flask, max_bytes: int) -> None:
    """Refuse request bodies over ``max_bytes`` with 413, before any other
    ``before_request`` hook registered after this call (authentication)."""
    if max_bytes < 1:
        raise ValueError(f"the body size limit must be positive, not {max_bytes}")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes

    @app.before_request
    def refuse_oversized_body() -> None:
        length = request.content_length
        if length is not None:
            if length > max_bytes:
                raise RequestEntityTooLarge()
        elif "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            _buffer_chunked_body(request.environ, max_bytes)


def _buffer_chunked_body(environ: dict, max_bytes: int) -> None:
    """Read a body of unknown length into memory, or raise 413 when it has
    more than ``max_bytes``; the view then reads it from the buffer."""
    stream = environ["wsgi.input"]
    parts: list[bytes] = []
    size = 0
    while size <= max_bytes:
        part = stream.read(min(READ_SIZE, max_bytes + 1 - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if size > max_bytes:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(b"".join(parts))
