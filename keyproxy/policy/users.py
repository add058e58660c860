"""End users: verifying the `Authorization: Bearer` token (JWT) sent next to a key.

The rules, each a refusal with its own message (never the token itself):
a fixed algorithm allowlist from the configuration (never `none`; HMAC only with a
shared secret, RSA/EC only with a public key: the configuration refuses mixing the
two, so a public key is never used as an HMAC secret); `jku`, `jwk` and `x5u`
headers are never read (keys come only from the configuration or its JWKS URL,
looked up by `kid`); `exp` is required; `exp`, `nbf` and `iat` are finite numbers (pyjwt's
JSON reader takes `Infinity`), `iat` not in the future; `iss` and `aud` must match exactly
when configured; `leeway` absorbs clock skew.

A verified token is remembered by its SHA-256 digest until it expires (at most
`cache_size` of them, the oldest dropped first), so the same browser token costs a
dict probe on its next requests, not a signature check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from keyproxy.request import Deny

if TYPE_CHECKING:
    from keyproxy.jwks import JwksCache

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
ALGORITHMS = HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
#: Shortest HMAC secret per algorithm: the hash's own size (RFC 7518 §3.2).
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

#: What a role or user id may look like once it is in a header or a query.
_ROLE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_USER_LENGTH = 256
#: Never in a user id: `%` (a percent-encoded id would collide with a raw one), `,`
#: (a backend reading the identity header as a list, as HTTP allows, or a filter
#: template such as `in.({user})`, would take `alice,x` for alice) and control characters.
_USER_REFUSED = re.compile(r"[%,\x00-\x1f\x7f-\x9f]")
MAX_ROLES = 32


@dataclass(frozen=True, slots=True)
class JwtSettings:
    algorithms: tuple[str, ...]
    secret: str | None = field(default=None, repr=False)
    public_key: Any = field(default=None, repr=False)  # a `cryptography` public key
    public_key_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    roles_claim: str = "roles"
    leeway: float = 0.0
    jwks_refresh: float = 300.0
    jwks_min_refresh: float = 10.0
    cache_size: int = 10_000


class Identity(NamedTuple):
    """Who a verified token speaks for."""

    user: str
    roles: tuple[str, ...]
    expires_at: float
    #: The JWKS key (kid) that verified it, and its members then: a cached token is
    #: forgotten when the provider removes or replaces that key. None: a configured key.
    kid: str | None = None
    jwk: dict[str, Any] | None = None


def _is_time(value: object) -> TypeGuard[float]:
    """A NumericDate: an int or a finite float (not a bool, a string, NaN or infinity)."""
    if type(value) is int:
        return True
    return isinstance(value, float) and math.isfinite(value)


#: The time claims a token must not be used before, and what a refusal for each says.
_NOT_BEFORE = (
    ("nbf", "the token is not valid yet (nbf)"),
    ("iat", "the token was issued in the future (iat)"),
)


def invalid(why: str) -> Deny:
    return Deny(401, "INVALID_TOKEN", f"invalid end-user token: {why}")


def _expired(exp: float) -> Deny:
    from keyproxy.policy.credentials import utc_text

    return Deny(401, "TOKEN_EXPIRED", f"the end-user token expired at {utc_text(exp)}")


class TokenVerifier:
    """Verifies tokens for one configuration snapshot; its cache goes with the snapshot,
    so a reload that changes the secret or the issuer forgets every earlier verdict."""

    __slots__ = ("_jwks_generation", "_options", "cache", "jwks", "leeway", "settings")

    def __init__(self, settings: JwtSettings, jwks: JwksCache | None = None) -> None:
        self.settings = settings
        self.leeway = settings.leeway
        self.jwks = jwks
        # A plain dict, oldest entry dropped when full: a hit is one C-level probe, where
        # cachetools.LRUCache's Python-level get measured ~1.5 µs on this path.
        self.cache: dict[bytes, Identity] = {}
        self._jwks_generation = jwks.generation if jwks is not None else 0
        self._options = {
            "require": ["exp"],
            # Times are checked against the caller's clock (explain passes its own).
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": settings.audience is not None,
            "verify_iss": settings.issuer is not None,
            "strict_aud": False,
        }

    def verify(self, token: str, now: float) -> Identity | Deny | Awaitable[Identity | Deny]:
        digest = sha256(token.encode()).digest()
        jwks = self.jwks
        if jwks is not None and jwks.generation != self._jwks_generation:
            self._forget_changed_keys(jwks)
        known = self.cache.get(digest)
        if known is not None:
            if known[2] + self.leeway > now:  # expires_at, by index: this is the hot path
                return known
            del self.cache[digest]
            return _expired(known.expires_at)
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            return invalid("not a well-formed JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            allowed = ", ".join(self.settings.algorithms)
            return invalid(f"algorithm {shown!r} is not accepted (allowed: {allowed})")
        if self.jwks is None:
            key = self.settings.secret if alg in HMAC_ALGORITHMS else self.settings.public_key
            return self._finish(token, digest, key, alg, now)
        kid = header.get("kid")
        if not isinstance(kid, str):
            kids = self.jwks.kids()
            if len(kids) != 1:
                return invalid("the token names no key id (kid)")
            kid = kids[0]
        jwk = self.jwks.key(kid, alg)
        if jwk is not None:
            return self._finish(token, digest, jwk, alg, now, kid)
        if not self.jwks.refresh_allowed(self.settings.jwks_min_refresh):
            return invalid("unknown key id (kid)")
        return self._after_refresh(token, digest, kid, alg, now)

    async def _after_refresh(
        self, token: str, digest: bytes, kid: str, alg: str, now: float
    ) -> Identity | Deny:
        assert self.jwks is not None
        await self.jwks.wait_for_refresh(self.settings.jwks_min_refresh)
        jwk = self.jwks.key(kid, alg)
        if jwk is None:
            return invalid("unknown key id (kid)")
        return self._finish(token, digest, jwk, alg, now, kid)

    def _forget_changed_keys(self, jwks: JwksCache) -> None:
        """The provider's keys changed: drop every cached token whose key is gone or
        replaced (a removed key is often a compromised one)."""
        self._jwks_generation = jwks.generation
        stale = [
            digest
            for digest, identity in self.cache.items()
            if identity.kid is not None and jwks.published(identity.kid) != identity.jwk
        ]
        for digest in stale:
            del self.cache[digest]

    def _finish(
        self, token: str, digest: bytes, key: Any, alg: str, now: float, kid: str | None = None
    ) -> Identity | Deny:
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,  # type: ignore[arg-type]  # pyjwt types options as its TypedDict
                audience=s.audience,
                issuer=s.issuer,
            )
        except InvalidSignatureError:
            return invalid("the signature does not verify")
        except MissingRequiredClaimError as error:
            return invalid(f"the {error.claim!r} claim is required")
        except InvalidAudienceError:
            return invalid("the audience (aud) is not this API's")
        except InvalidIssuerError:
            return invalid("the issuer (iss) is not the configured one")
        except InvalidAlgorithmError:
            return invalid("the algorithm does not match the key")
        except DecodeError:
            return invalid("the token cannot be decoded")
        except PyJWTError as error:
            return invalid(f"rejected ({type(error).__name__})")
        return self._identity(claims, digest, now, kid)

    def _identity(
        self, claims: dict[str, Any], digest: bytes, now: float, kid: str | None = None
    ) -> Identity | Deny:
        s = self.settings
        exp = claims.get("exp")
        if not _is_time(exp):
            # JSON as Python reads it takes `Infinity` and `NaN`: a token whose expiry
            # never comes, or compares false with every clock, never expires.
            return invalid("the 'exp' claim must be a number, and finite")
        if exp + s.leeway <= now:
            return _expired(exp)
        # `iat` in the future is what pyjwt refuses by default (its own time checks are
        # off: times are compared with the caller's clock).
        for name, early in _NOT_BEFORE:
            value = claims.get(name)
            if value is not None:
                if not _is_time(value):
                    return invalid(f"the '{name}' claim must be a number, and finite")
                if value - s.leeway > now:
                    return invalid(early)
        user = claims.get(s.user_claim)
        if isinstance(user, str) and _USER_REFUSED.search(user):
            # Its upstream (percent-encoded) form could then equal another user's id.
            return invalid(
                f"user id in {s.user_claim!r} may not contain '%', ',' or control characters"
            )
        if (
            not isinstance(user, str)
            or not user
            or len(user) > MAX_USER_LENGTH
            or not user.isprintable()
            or user != user.strip()  # a header would lose the spaces: " alice" is "alice"
        ):
            return invalid(
                f"the {s.user_claim!r} claim must be a printable string without outer spaces"
            )
        raw_roles = claims.get(s.roles_claim)
        if raw_roles is None:
            roles: tuple[str, ...] = ("user",)
        elif isinstance(raw_roles, str):
            roles = (raw_roles,)
        elif isinstance(raw_roles, list) and all(isinstance(r, str) for r in raw_roles):
            roles = tuple(dict.fromkeys(raw_roles))
        else:
            return invalid(f"the {s.roles_claim!r} claim must be a string or a list of strings")
        if len(roles) > MAX_ROLES or not all(_ROLE.fullmatch(r) for r in roles):
            return invalid(f"the {s.roles_claim!r} claim holds a role name keyproxy cannot use")
        jwk = self.jwks.published(kid) if kid is not None and self.jwks is not None else None
        identity = Identity(user, roles, float(exp), kid, jwk)
        cache = self.cache
        if len(cache) >= s.cache_size:
            del cache[next(iter(cache))]
        cache[digest] = identity
        return identity
