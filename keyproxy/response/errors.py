"""What keyproxy itself says on the wire: JSON error answers and reason phrases.

Error bodies are built here and only here, from a `Deny`, so they can never
carry upstream hosts, exception text or secrets: the message is always one of
keyproxy's own sentences.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from keyproxy.request import Deny

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    """The standard reason phrase; never the upstream's, which is free text it controls."""
    return REASONS.get(status, b"Unknown")


def error_body(deny: Deny, request_id: str) -> bytes:
    return json.dumps(
        {
            "statusCode": deny.status,
            "error": deny.code,
            "message": deny.message,
            "requestId": request_id,
        },
        separators=(",", ":"),
    ).encode()


def error_response(
    deny: Deny, request_id: str, extra: bytes = b"", head_only: bool = False
) -> bytes:
    """A whole HTTP response for a refusal: status line, headers, JSON body.

    `extra` is further header lines (rate-limit state, `Connection`); `head_only`
    leaves the body out, as an answer to HEAD must.
    """
    body = error_body(deny, request_id)
    headers = b"".join(f"{n}: {v}\r\n".encode() for n, v in deny.headers)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Request-Id: %s\r\n"
        % (deny.status, reason(deny.status), len(body), request_id.encode())
        + headers
        + extra
        + b"\r\n"
        + (b"" if head_only else body)
    )
