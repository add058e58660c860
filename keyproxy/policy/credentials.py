"""Who is calling: the credential a request presents, and the key it names (decision step 1).

Everything here is pure: the caller passes in the headers, the query string and
the clock. The rules (docs/security.md): every copy of a credential header is
seen (`Headers.getall`), credentials never add up (two of them are refused, not
merged or ranked), and no key, token or digest ever appears in a message or a
`repr`, because messages end up in error bodies and logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import unquote_plus

import yaml

from keyproxy.config.model import Key
from keyproxy.policy.paths import param_readings
from keyproxy.request import Deny, Headers

MIN_KEY_LENGTH = 16
MAX_KEY_LENGTH = 256

#: RFC 7235 token68, the shape of a Basic payload and of a JWT. A fixed pattern that
#: cannot backtrack: one character class, then one.
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: Far more than any JWT a sane issuer signs; a bound keeps a hostile header cheap.
MAX_BEARER_LENGTH = 16 * 1024

KEY_KINDS = {"publishable": ("pk_", "read"), "secret": ("sk_", "write")}


#: NamedTuple's own constructor is a Python function; calling `tuple.__new__` directly
#: builds the same object at a third of the cost, which counts for values built on
#: every request.
_new_tuple = tuple.__new__


class Presented(NamedTuple):
    """The credential a request carries, as read off the wire and not yet looked up.

    `source` is "header", "basic" or "query" for a key, or "bearer" when the request
    carries only a Bearer token (then `key` is ""). `key_id` is set for Basic only.
    """

    source: str
    key: str
    key_id: str | None = None
    bearer: str | None = None

    def __repr__(self) -> str:
        # The dataclass repr would print the key and the token into any traceback or log.
        key = "<redacted>" if self.key else "''"
        bearer = "None" if self.bearer is None else "<redacted>"
        return (
            f"Presented(source={self.source!r}, key={key}, key_id={self.key_id!r}, bearer={bearer})"
        )


def _invalid(message: str) -> Deny:
    return Deny(401, "INVALID_TOKEN", message)


def _ambiguous(message: str) -> Deny:
    return Deny(400, "AMBIGUOUS_CREDENTIALS", message + ": send exactly one API key")


def _accepted(sources: frozenset[str], query_param: str) -> str:
    """The ways of sending a key this deployment accepts, in words a client can act on."""
    ways = []
    if "header" in sources:
        ways.append("the X-API-Key header")
    if "basic" in sources:
        ways.append("Authorization: Basic base64(<key id>:<key>)")
    if "query" in sources:
        ways.append(f"the ?{query_param}=<key> query parameter")
    if not ways:
        return "nothing (no credential source is enabled)"
    if len(ways) == 1:
        return ways[0]
    return ", ".join(ways[:-1]) + " or " + ways[-1]


def _query_pairs(query: str) -> list[tuple[str, str, str]]:
    """(raw piece, decoded name, decoded value) for each `&`-separated piece.

    Names are percent-decoded before comparison so `%61pi_key` cannot slip a key
    past the check (and into the forwarded URL) while the upstream decodes it
    into `api_key`. Decoding follows form rules (`+` is a space), as
    `urllib.parse.parse_qsl` and most upstream frameworks do.
    """
    pairs = []
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        pairs.append((piece, unquote_plus(name), unquote_plus(value)))
    return pairs


def strip_query_param(query: str, name: str) -> str:
    """`query` without any occurrence of parameter `name` (compared by decoded name).

    Everything else is kept byte for byte, because the canonical target the
    decision saw is what gets forwarded; only the client's key is taken out.
    """
    if not query:
        return query
    return "&".join(raw for raw, decoded, _ in _query_pairs(query) if decoded != name)


def _valid_key(key: str) -> bool:
    # Printable ASCII without space: a key that needs quoting or escaping anywhere is
    # refused. Three str methods cost less than a regex.
    return (
        MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH
        and key.isascii()
        and key.isprintable()
        and " " not in key
    )


def _decode_basic(payload: str) -> tuple[str, str] | Deny:
    """Strict RFC 7617 decoding: anything lenient decoders would "repair" is refused."""
    malformed = _invalid("malformed Basic credentials: expected base64(<key id>:<key>)")
    if not payload or _TOKEN68_RE.fullmatch(payload) is None:
        return malformed
    try:
        text = base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return malformed
    key_id, colon, key = text.partition(":")
    if not colon or not key_id:
        return malformed
    return key_id, key


def extract(
    headers: Headers, query: str, sources: frozenset[str], query_param: str
) -> Presented | Deny:
    """Read the one credential a request presents, or say precisely why it cannot be used.

    Every source is read whether or not it is enabled, so that a key sent the
    wrong way gets a message saying how to send it, and so that a disabled
    source can never carry a second key past the ambiguity check.
    """
    api_keys: list[str] = []
    authorizations: list[str] = []
    for name, value in headers:  # one pass over the headers for both
        if name == "x-api-key":
            api_keys.append(value)
        elif name == "authorization":
            authorizations.append(value)
    query_values: list[str] = []
    if query:
        lowered = query_param.lower()
        for _, name, value in _query_pairs(query):
            if name == query_param:
                query_values.append(value)
            elif lowered in name.lower() and lowered in param_readings(name):
                # `api_key[]`, `[api_key]`, `api_key.x`: frameworks read these as the key
                # parameter too, so a second key (or the first) would reach the upstream.
                return _invalid(
                    f"a key in the query is sent as ?{query_param}=<key> exactly,"
                    " never in a bracketed or dotted spelling"
                )

    if len(api_keys) > 1:
        return _ambiguous("more than one X-API-Key header")
    if api_keys and "," in api_keys[0]:
        return _ambiguous("the X-API-Key header holds a comma-separated list")
    if len(authorizations) > 1:
        return _ambiguous("more than one Authorization header")
    if len(query_values) > 1:
        return _ambiguous(f"the {query_param} query parameter appears more than once")
    if query_values and "," in query_values[0]:
        return _ambiguous(f"the {query_param} query parameter holds a comma-separated list")

    scheme = payload = ""
    if authorizations:
        scheme, _, payload = authorizations[0].strip(" \t").partition(" ")
        scheme = scheme.lower()
        payload = payload.strip(" \t")

    present = []
    if api_keys:
        present.append("header")
    if scheme == "basic":
        present.append("basic")
    if query_values:
        present.append("query")
    if len(present) > 1:
        return _ambiguous("API keys in " + " and ".join(present))

    if authorizations and scheme not in ("basic", "bearer"):
        return _invalid("unsupported Authorization scheme: use Basic (API key) or Bearer (JWT)")

    bearer: str | None = None
    if scheme == "bearer":
        if (
            not payload
            or len(payload) > MAX_BEARER_LENGTH
            or _TOKEN68_RE.fullmatch(payload) is None
        ):
            return _invalid("malformed Bearer token")
        bearer = payload

    if not present:
        if bearer is not None:
            return Presented("bearer", "", None, bearer)
        return Deny(
            401,
            "UNAUTHORIZED",
            f"missing API key: send it as {_accepted(sources, query_param)}",
        )

    source = present[0]
    if source not in sources:
        names = {
            "header": "the X-API-Key header",
            "basic": "Basic credentials",
            "query": "the query string",
        }
        return _invalid(
            f"API keys in {names[source]} are not accepted here: "
            f"send it as {_accepted(sources, query_param)}"
        )

    key_id: str | None = None
    if source == "header":
        key = api_keys[0].strip(" \t")
    elif source == "query":
        key = query_values[0]
    else:
        decoded = _decode_basic(payload)
        if isinstance(decoded, Deny):
            return decoded
        key_id, key = decoded

    if not _valid_key(key):
        return _invalid(
            f"malformed key: an API key is {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} "
            "printable ASCII characters"
        )
    return _new_tuple(Presented, (source, key, key_id, bearer))


def sha256_digest(key: str) -> bytes:
    """The index a key is stored and found under: a 256-bit random key needs no slow hash."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def utc_text(epoch: float) -> str:
    try:
        moment = datetime.fromtimestamp(epoch, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f} (epoch seconds)"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


UNKNOWN_KEY = _invalid("unknown API key")


def lookup(presented: Presented, keys_by_digest: Mapping[bytes, Key], now: float) -> Key | Deny:
    """The configured key a presented credential names, if it is usable at `now`.

    The lookup is one dict probe on a SHA-256 digest: its cost does not depend
    on how many keys exist, and timing reveals at most something about a hash
    of the attacker's own guess. Unknown keys and Basic id mismatches get the
    same answer, so the response never confirms that half of a guess was right.
    """
    unknown = UNKNOWN_KEY
    if not presented.key:
        return unknown
    key = keys_by_digest.get(sha256_digest(presented.key))
    if presented.source == "basic":
        given = (presented.key_id or "").encode("utf-8")
        expected = key.id.encode("utf-8") if key is not None else b"\x00"
        if not hmac.compare_digest(given, expected):
            return unknown
    if key is None:
        return unknown
    return usable(key, now)


def usable(key: Key, now: float) -> Key | Deny:
    """`key` if it may be used at `now`: neither revoked, expired nor a hash past its grace.

    Shared by the lookup of a presented key and by an identity vouched for by
    `explain --key-id` or `replay`, so both refuse a key for the same reasons.
    """
    if key.revoked:
        return Deny(401, "TOKEN_REVOKED", f"API key {key.id!r} has been revoked")
    if key.expires_at is not None and key.expires_at <= now:
        return Deny(
            401, "TOKEN_EXPIRED", f"API key {key.id!r} expired at {utc_text(key.expires_at)}"
        )
    rotation = key.rotation
    if rotation is not None and rotation.until is not None and rotation.until <= now:
        # An old hash after its grace period: say so, so the client's owner knows that a
        # new key exists rather than hunting for a typo.
        return Deny(
            401,
            "TOKEN_EXPIRED",
            f"this key was rotated on {utc_text(rotation.until)}; use the new key",
        )
    return key


def generate_key(kind: str) -> str:
    """A new random key: `pk_` (publishable) or `sk_` (secret) and 256 bits as 64 hex digits."""
    if kind not in KEY_KINDS:
        raise ValueError(f"unknown key kind {kind!r}: expected publishable or secret")
    return KEY_KINDS[kind][0] + secrets.token_hex(32)


def _yaml_scalar(text: str) -> str:
    """`text` as a YAML scalar that reads back as the same string (ids like `no` or `1e3`)."""
    try:
        if yaml.safe_load(f"v: {text}") == {"v": text}:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def yaml_entry(key: str, key_id: str, kind: str) -> str:
    """The `keys:` list entry for a new key. It holds the key's hash, never the key."""
    if kind not in KEY_KINDS:
        raise ValueError(f"unknown key kind {kind!r}: expected publishable or secret")
    return (
        f"  - id: {_yaml_scalar(key_id)}\n"
        f"    hash: sha256:{sha256_digest(key).hex()}\n"
        f"    type: {KEY_KINDS[kind][1]}\n"
        "    # optional: acls, referers, ips, expires (or ttl), rate_limit, quota\n"
    )


def rotation_block(
    new_key: str, old: list[tuple[bytes, float | None]], now: float, grace: float
) -> tuple[str, float]:
    """The `hashes:` lines that rotate a key to `new_key`, and when the grace ends.

    `old` is the key's current hashes, newest first, with their `until` if any. Each
    one still valid gets `until` = now + grace, unless it already ends sooner or later
    by the operator's own choice (kept); one already past its `until` is left out: it
    is refused anyway. The lines hold hashes only, never a key.
    """
    ends = now + grace
    lines = ["    hashes:", f"      - sha256:{sha256_digest(new_key).hex()}"]
    for digest, until in old:
        if until is not None and until <= now:
            continue
        when = ends if until is None else until
        lines.append(f'      - {{hash: "sha256:{digest.hex()}", until: {utc_text(when)}}}')
    return "\n".join(lines) + "\n", ends


_ROTATED = re.compile(r'- \{hash: "(sha256:[0-9a-f]{64})", until: (\S+)\}')


def json_hashes(block: str) -> str:
    """`rotation_block`'s lines as the `"hashes"` field of a `keys_file` line."""
    entries: list[object] = []
    for line in block.splitlines()[1:]:
        rotated = _ROTATED.search(line)
        if rotated is not None:
            entries.append({"hash": rotated.group(1), "until": rotated.group(2)})
        else:
            entries.append(line.strip().removeprefix("- "))
    return '"hashes": ' + json.dumps(entries)


def upstream_query(
    query: str,
    key_in_query: bool,
    query_param: str,
    inject_names: tuple[str, ...],
    inject_query: str,
    owner_filter: str | None = None,
) -> str:
    """The query the upstream gets, for the request and the owner check's read alike: the
    client's key removed when it came in the query, a self-only list's owner filter
    added, and the parameters keyproxy injects replacing any copy the client sent."""
    if query and key_in_query:
        query = strip_query_param(query, query_param)
    if owner_filter is not None:
        query = f"{query}&{owner_filter}" if query else owner_filter
    if inject_query:
        for name in inject_names:
            if query:
                query = strip_query_param(query, name)
        query = f"{query}&{inject_query}" if query else inject_query
    return query
