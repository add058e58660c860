"""The identity provider's public keys (JWKS), fetched off the request path.

One `JwksCache` per URL lives for the whole process, across configuration
reloads, so a reload never forgets the keys. A background task in the serving
process refreshes it every `jwks_refresh`; a token naming an unknown `kid` may
ask for one extra refresh, at most once per `jwks_min_refresh`, and waits for
it (bounded by `REFRESH_WAIT`). A failed fetch keeps the keys already known:
an identity-provider outage never refuses tokens signed with known keys.

`refreshes` counts fetches by result ("ok", "error") for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from keyproxy.observability import log_event

#: Longest a request waits for a refresh its unknown `kid` asked for.
REFRESH_WAIT = 3.0
#: Largest JWKS document read; real ones are a few KiB.
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0

#: Which key type each algorithm family verifies with: a JWKS key of another type is
#: never used, and `oct` (HMAC) keys from a JWKS never are.
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


class JwksCache:
    __slots__ = (
        "_inflight",
        "_jwks",
        "_task",
        "generation",
        "keys",
        "last_attempt",
        "last_success",
        "refresh_interval",
        "refreshes",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        #: kid -> the key's JWK members, as published (only signature keys of known types).
        self._jwks: dict[str, dict[str, Any]] = {}
        #: (kid, alg) -> the parsed key, built on first use.
        self.keys: dict[tuple[str, str], PyJWK] = {}
        #: Bumped whenever the published keys change: verifiers then forget the tokens
        #: they cached under a key that is gone or changed.
        self.generation = 0
        self.refreshes: Counter[str] = Counter()
        self.last_attempt = -1e18  # monotonic
        self.last_success: float | None = None
        self.refresh_interval = 300.0
        self._inflight: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what the verifier asks ---------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.last_success is not None

    def kids(self) -> list[str]:
        return list(self._jwks)

    def published(self, kid: str) -> dict[str, Any] | None:
        """The JWK members published under `kid` now, or None."""
        return self._jwks.get(kid)

    def key(self, kid: str, alg: str) -> PyJWK | None:
        """The published key `kid` for `alg`, or None if unknown or of another type."""
        found = self.keys.get((kid, alg))
        if found is not None:
            return found
        jwk = self._jwks.get(kid)
        if jwk is None:
            return None
        if jwk.get("kty") != KEY_TYPES.get(alg[:2]) or jwk.get("alg", alg) != alg:
            return None
        try:
            found = PyJWK(jwk, alg)
        except (PyJWTError, ValueError, TypeError):
            return None
        self.keys[(kid, alg)] = found
        return found

    def refresh_allowed(self, min_interval: float) -> bool:
        return self._inflight is not None or time.monotonic() - self.last_attempt >= min_interval

    async def wait_for_refresh(self, min_interval: float) -> None:
        """Ask for a refresh (joining one in flight) and wait for it, within REFRESH_WAIT."""
        if self._inflight is None:
            if time.monotonic() - self.last_attempt < min_interval:
                return
            self._inflight = asyncio.ensure_future(self.refresh())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._inflight), REFRESH_WAIT)

    # -- fetching -------------------------------------------------------------------
    async def refresh(self) -> None:
        self.last_attempt = time.monotonic()
        try:
            document = await self._fetch()
            jwks = self._parse(document)
        except Exception as error:  # any failure keeps the known keys
            self.refreshes["error"] += 1
            log_event("jwks_refresh_failed", url=self.url, error=type(error).__name__)
        else:
            if jwks != self._jwks:
                self._jwks = jwks
                self.keys = {}
                self.generation += 1
            self.last_success = time.monotonic()
            self.refreshes["ok"] += 1
        finally:
            self._inflight = None

    async def _fetch(self) -> Any:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            return json.loads(body)

    @staticmethod
    def _parse(document: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS document")
        jwks: dict[str, dict[str, Any]] = {}
        for jwk in document["keys"]:
            if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
                continue
            if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC"):
                continue
            jwks[jwk["kid"]] = jwk
        return jwks

    async def run(self) -> None:
        """Refresh now, then every `refresh_interval`, until cancelled."""
        while True:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self.refresh())
            await asyncio.shield(self._inflight)
            await asyncio.sleep(self.refresh_interval)

    def start(self, loop: asyncio.AbstractEventLoop, refresh_interval: float) -> None:
        """Run the background refresh in `loop` (once; later calls update the interval)."""
        self.refresh_interval = refresh_interval
        if self._task is None or self._task.done():
            self._task = loop.create_task(self.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


_CACHES: dict[str, JwksCache] = {}
_LOCK = threading.Lock()  # configurations are parsed on a worker thread


def jwks_cache(url: str) -> JwksCache:
    """The process's cache for `url`, shared by every configuration that names it."""
    with _LOCK:
        cache = _CACHES.get(url)
        if cache is None:
            cache = _CACHES[url] = JwksCache(url)
        return cache


def refresh_counts() -> dict[str, int]:
    """Fetches by result ("ok", "error") over every JWKS this process keeps, for metrics
    (`keyproxy_jwks_refreshes_total{result}`)."""
    with _LOCK:
        caches = list(_CACHES.values())
    total: Counter[str] = Counter()
    for cache in caches:
        total.update(cache.refreshes)
    return dict(total)
