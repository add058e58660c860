"""`keyproxy explain`: the decision replayed offline, step by step.

It builds the same `RequestContext` the server builds and runs the same
`Pipeline`, so "why was this refused?" is answered by the code that refused
it. Counters are not shared with a running proxy: the rate-limit step shows
the key's limits as a fresh bucket would see them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from keyproxy.checks import REPORTED, Pipeline, StepOutcome, build_checks
from keyproxy.checks.permissions import OwnershipCheck
from keyproxy.config.model import Config, RateLimitSettings
from keyproxy.forward import ForwardPlan
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, Reply, RequestContext


@dataclass(frozen=True, slots=True)
class Explanation:
    steps: list[StepOutcome]
    allowed: bool
    forward_to: str | None
    reply: Reply | None = None  # keyproxy answers the request itself (a CORS preflight)


def split_url(url: str) -> tuple[str, str]:
    """(host, request-target) of an absolute URL or a bare target, without re-encoding."""
    _, sep, rest = url.partition("://")
    if not sep:
        return "", url
    authority, slash, tail = rest.partition("/")
    target = slash + tail
    if "?" in authority:  # "http://host?x" has an empty path
        authority, _, query = authority.partition("?")
        target = "/?" + query
    return authority, target or "/"


async def explain(
    config: Config,
    method: str,
    url: str,
    *,
    key: str | None = None,
    key_id: str | None = None,
    jwt: str | None = None,
    ip: str = "127.0.0.1",
    referer: str | None = None,
    now: float | None = None,
    origin: str | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> Explanation:
    host, target = split_url(url)
    headers: list[tuple[str, str]] = [("host", host or "localhost")]
    if key is not None:
        headers.append(("x-api-key", key))
    if jwt is not None:
        headers.append(("authorization", f"Bearer {jwt}"))
    if referer is not None:
        headers.append(("referer", referer))
    if origin is not None:
        headers.append(("origin", origin))
    headers += [(n.lower(), v) for n, v in extra_headers]
    ctx = RequestContext(
        config,
        method.upper(),
        target,
        Headers(headers),
        ip,
        time.time() if now is None else now,
        "explain",
    )
    if key_id is not None:
        # The operator names the key instead of presenting it: step 1 takes it as found.
        ctx.key = next(k for k in config.keys if k.id == key_id)
        ctx.credential_source = "--key-id"
    users = config.users
    if jwt is not None and users is not None and users.jwks is not None and not users.jwks.loaded:
        await users.jwks.refresh()  # offline, but a token needs the provider's keys
    pipeline = Pipeline(
        build_checks(open_limiter(RateLimitSettings()), OwnershipCheck(online=False))
    )
    steps = await pipeline.trace(ctx)
    reply = steps[-1].reply if steps else None
    if reply is not None:
        return Explanation(steps, False, None, reply)
    allowed = all(step.deny is None or step.detail == REPORTED for step in steps)
    forward_to = None
    if allowed:
        plan = ForwardPlan(config)
        target = config.upstream.origin + plan.upstream_target(ctx)
        # An injected query secret is part of the forwarded URL: show where it goes, not it.
        forward_to = plan.scrubber.redact(target.encode()).decode()
    return Explanation(steps, allowed, forward_to)


def render(explanation: Explanation, method: str, url: str, config: Config) -> str:
    lines = [f"request: {method.upper()} {url}"]
    width = max(len(s.name) for s in explanation.steps)
    for step in explanation.steps:
        if step.reply is not None:
            lines.append(f"  REPLY {step.name:<{width}}  {step.detail}")
        elif step.deny is None:
            lines.append(f"  pass  {step.name:<{width}}  {step.detail}")
        elif step.detail == REPORTED:
            d = step.deny
            lines.append(
                f"  WOULD {step.name:<{width}}  {d.status} {d.code}: {d.message} -- {REPORTED}"
            )
        else:
            d = step.deny
            lines.append(f"  DENY  {step.name:<{width}}  {d.status} {d.code}: {d.message}")
    if explanation.reply is not None:
        status = explanation.reply.status
        lines.append(f"verdict: REPLY {status} from keyproxy itself (no key, no upstream)")
    elif explanation.allowed:
        up = config.upstream
        injected = [n for n, _ in up.inject_headers]
        if up.inject_basic is not None:
            injected.append("Authorization (Basic)")
        injected += [f"?{n}=" for n, _ in up.inject_query]
        what = ", ".join(injected) if injected else "nothing"
        lines.append(f"verdict: ALLOW -> {method.upper()} {explanation.forward_to}")
        lines.append(f"         client credentials removed; injected: {what}")
        reported = [s.deny for s in explanation.steps if s.deny is not None]
        if reported:
            d = reported[0]
            lines.append(f"         would deny (report mode): {d.status} {d.code}")
    else:
        d = next(s.deny for s in explanation.steps if s.deny is not None and s.detail != REPORTED)
        assert d is not None
        lines.append(f"verdict: DENY {d.status} {d.code}")
    if config.rate_limits.store != "memory":
        lines.append("note: rate limits shown for a fresh bucket; live counters are in the store")
    return "\n".join(lines)
