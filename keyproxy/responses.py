"""What keyproxy itself says on the wire: JSON errors and scrubbed upstream headers.

Error bodies are built here and only here, from a `Deny`, so they can never
carry upstream hosts, exception text or secrets: the message is always one of
keyproxy's own sentences.
"""

from __future__ import annotations

import base64
import json
import re
from http import HTTPStatus
from typing import NamedTuple

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


# Denials the server itself produces, outside the pipeline.
BAD_REQUEST = Deny(400, "BAD_REQUEST", "the request is not valid HTTP/1.1")
HEADERS_TOO_LARGE = Deny(431, "HEADERS_TOO_LARGE", "the request headers are too large")
REQUEST_TIMEOUT = Deny(408, "REQUEST_TIMEOUT", "the request was not received in time")
UPGRADE_NOT_ALLOWED = Deny(
    400, "UPGRADE_NOT_ALLOWED", "protocol upgrades (Upgrade, CONNECT) are not allowed"
)
UPSTREAM_UNAVAILABLE = Deny(502, "UPSTREAM_UNAVAILABLE", "the upstream service is unavailable")
UPSTREAM_TIMEOUT = Deny(504, "UPSTREAM_TIMEOUT", "the upstream service did not answer in time")
SHUTTING_DOWN = Deny(503, "SHUTTING_DOWN", "keyproxy is shutting down; retry")


def payload_too_large(limit: int) -> Deny:
    return Deny(413, "PAYLOAD_TOO_LARGE", f"the request body exceeds the limit of {limit} bytes")


def _hex_digit(digit: str) -> bytes:
    return digit.encode() if digit.isdigit() else f"[{digit}{digit.lower()}]".encode()


def _any_spelling(secret: bytes) -> bytes:
    """A regex for `secret` with any of its bytes raw or percent-escaped (either case
    of hex digits), and a space also as `+`: every way a URL or form may write it."""
    parts = []
    for byte in secret:
        high, low = f"{byte:02X}"
        spellings = [re.escape(bytes([byte])), b"%" + _hex_digit(high) + _hex_digit(low)]
        if byte == 0x20:
            spellings.append(rb"\+")
        parts.append(b"(?:" + b"|".join(spellings) + b")")
    return b"".join(parts)


class Spelling(NamedTuple):
    """One way a secret may be written in a response, as the scrubbers search for it.

    `longest`: the longest text the pattern can match (the body scrubber holds
    back that much minus one byte at a chunk's end). `anchors`: every match
    contains one of these literals, so a body with none of them is known clean
    after a few fast substring searches, without running the pattern.
    """

    pattern: bytes
    longest: int
    anchors: tuple[bytes, ...]


def _longest_run_without_space(raw: bytes) -> bytes:
    """Raw bytes a match with no `%` must contain: only a space has another spelling (`+`)."""
    return max(raw.split(b" "), key=len)


def secret_spellings(
    secrets: tuple[str, ...], basic: tuple[str, str] | None = None
) -> list[Spelling]:
    """Every spelling of the secrets to search for, shared by the header and body scrubbers."""
    spellings = []
    for secret in secrets:
        if secret:
            raw = secret.encode("utf-8")
            run = _longest_run_without_space(raw)
            # Each byte at most `%XX`; a match without any `%` holds the longest
            # space-free run of the secret as it is.
            anchors = (b"%", run) if run else (b"%", b" ", b"+")
            spellings.append(Spelling(_any_spelling(raw), 3 * len(raw), anchors))
    if basic is not None:
        pair = f"{basic[0]}:{basic[1]}".encode()
        for encoded in {base64.b64encode(pair), base64.urlsafe_b64encode(pair)}:
            # Unpadded: a padded spelling contains it, and is redacted up to its '='.
            unpadded = encoded.rstrip(b"=")
            spellings.append(Spelling(re.escape(unpadded), len(unpadded), (unpadded,)))
    return spellings


class SecretScrubber:
    """Replaces every spelling of the upstream's secrets in response header values.

    An upstream may echo its key in a header, a cookie or a redirect URL; the
    client must never see it. Each secret is searched for with any of its
    characters raw or percent-escaped, and Basic credentials also as standard or
    URL-safe base64 with or without padding, in one compiled alternation.
    """

    REDACTED = b"[REDACTED]"

    def __init__(self, secrets: tuple[str, ...], basic: tuple[str, str] | None = None) -> None:
        patterns = [spelling.pattern for spelling in secret_spellings(secrets, basic)]
        patterns.sort(key=len, reverse=True)
        self._pattern = re.compile(b"|".join(patterns)) if patterns else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def found_in(self, data: bytes) -> bool:
        return self._pattern is not None and self._pattern.search(data) is not None

    def scrub(self, value: bytes) -> bytes:
        if self._pattern is None:
            return value
        return self._pattern.sub(self.REDACTED, value)
