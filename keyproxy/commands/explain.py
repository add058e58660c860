"""`keyproxy explain`: the decision replayed offline, step by step.

It builds the same `RequestContext` the server builds and runs the same
`Pipeline`, so "why was this refused?" is answered by the code that refused
it. Counters are not shared with a running proxy: the rate-limit step shows
the key's limits as a fresh bucket would see them.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from urllib.parse import quote

from keyproxy.checks import REPORTED, Pipeline, StepOutcome, build_checks
from keyproxy.checks.permissions import OwnershipCheck
from keyproxy.config.model import CREDENTIAL_SOURCES, Config, RateLimitSettings
from keyproxy.forward.plan import ForwardPlan
from keyproxy.policy.credentials import sha256_digest
from keyproxy.policy.refusals import head_refusal
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, Reply, RequestContext, Vouched


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


def default_source(config: Config) -> str:
    """The first source (in `CREDENTIAL_SOURCES` order) this deployment accepts, so a
    query- or Basic-only deployment can be explained without naming it; with none
    enabled, the header (then refused with the live message)."""
    enabled = config.server.credential_sources
    return next((s for s in CREDENTIAL_SOURCES if s in enabled), "header")


def present_key(
    config: Config, key: str, via: str, target: str
) -> tuple[list[tuple[str, str]], str]:
    """(headers to add, request-target) carrying `key` the way a client sends it `via`.

    Basic credentials need the key's id next to it: it is looked up from the key
    itself, and an unknown key gets a placeholder id (refused alike either way).
    """
    if via == "header":
        return [("x-api-key", key)], target
    if via == "basic":
        found = config.keys_by_digest.get(sha256_digest(key))
        key_id = found.id if found is not None else "unknown"
        token = base64.b64encode(f"{key_id}:{key}".encode()).decode("ascii")
        return [("authorization", f"Basic {token}")], target
    if via == "query":
        param = f"{quote(config.server.query_param, safe='')}={quote(key, safe='')}"
        return [], target + ("&" if "?" in target else "?") + param
    raise ValueError(f"unknown credential source {via!r}")


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
    via: str | None = None,
) -> Explanation:
    """`via` is how the key travels ("header", "basic" or "query"); by default the
    first source `server.credential_sources` enables."""
    host, target = split_url(url)
    extra = [(n.lower(), v) for n, v in extra_headers]
    # A Host given with --header replaces the URL's (give two to see that refusal).
    headers: list[tuple[str, str]] = []
    if not any(n == "host" for n, _ in extra):
        headers.append(("host", host or "localhost"))
    if key is not None:
        added, target = present_key(config, key, via or default_source(config), target)
        headers += added
    if jwt is not None:
        headers.append(("authorization", f"Bearer {jwt}"))
    if referer is not None:
        headers.append(("referer", referer))
    if origin is not None:
        headers.append(("origin", origin))
    headers += extra
    refused = head_refusal(headers)
    if refused is not None:  # the server refuses this head before any check runs
        return Explanation([StepOutcome(PARSE_STEP, refused, refused.message)], False, None)
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
        # The operator names the key instead of presenting it: step 1 takes it by id
        # (and still refuses it if it is revoked or expired).
        ctx.vouched = Vouched(key_id)
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


#: The decision's steps as the documentation numbers them; a step the pipeline has no
#: check for (nothing to enforce yet) is still listed, so the numbers never jump.
STEP_NAMES = {
    0: "cors preflight",
    1: "credential",
    2: "key constraints",
    3: "route",
    4: "key type",
    5: "acl",
    6: "scopes",
    7: "roles",
    8: "rate limit",
}
OFFLINE_NOTE = "not evaluated offline: a fresh bucket, not the live counts"
#: The step before the checks: the server parses the head and may refuse it there.
PARSE_STEP = "parse"


def _number(step: StepOutcome) -> int:
    head = step.name.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def numbered_steps(explanation: Explanation) -> list[dict[str, object]]:
    """Every step by its documented number: passed, refused, or skipped (nothing to check).

    The CORS preflight step shows only when it answered; the checks that share a number
    (7: roles, then own records) are one entry, refused by whichever refused.
    """
    out: list[dict[str, object]] = []
    last = 0
    for step in explanation.steps:
        if step.name == PARSE_STEP and step.deny is not None:
            d = step.deny
            out.append(
                {"step": PARSE_STEP, "name": "request head", "result": "deny"}
                | {"status": d.status, "code": d.code, "detail": d.message}
            )
            continue
        number = _number(step)
        if number == 0 and step.reply is None:
            continue  # not a preflight: nothing to say about this request
        if number == last and out and out[-1]["result"] == "pass" and step.deny is None:
            out[-1]["detail"] = f"{out[-1]['detail']}; {step.detail}"
            continue
        for missing in range(last + 1, number):
            out.append(
                {
                    "step": missing,
                    "name": STEP_NAMES.get(missing, ""),
                    "result": "skip",
                    "detail": "nothing to check: not configured",
                }
            )
        if number == last and out:
            out.pop()  # a later check of the same step refused: it speaks for the step
        last = max(last, number)
        name = STEP_NAMES.get(number, step.name.split(" ", 1)[-1])
        entry: dict[str, object] = {"step": number, "name": name}
        if step.reply is not None:
            entry.update(result="reply", status=step.reply.status, detail=step.detail)
        elif step.deny is None:
            detail = step.detail
            if name == "rate limit":  # the remaining count of a fresh bucket says nothing live
                detail = f"{detail.split('; ', 1)[0]} ({OFFLINE_NOTE})"
            entry.update(result="pass", detail=detail)
        else:
            d = step.deny
            result = "would deny" if step.detail == REPORTED else "deny"
            entry.update(result=result, status=d.status, code=d.code, detail=d.message)
        out.append(entry)
    return out


def injected_names(config: Config) -> list[str]:
    """What keyproxy adds upstream, by name only."""
    up = config.upstream
    injected = [n for n, _ in up.inject_headers]
    if up.inject_basic is not None:
        injected.append("Authorization (Basic)")
    injected += [f"?{n}=" for n, _ in up.inject_query]
    return injected


def _enforced_denial(explanation: Explanation) -> Deny:
    d = next(s.deny for s in explanation.steps if s.deny is not None and s.detail != REPORTED)
    assert d is not None
    return d


def _reported(explanation: Explanation) -> Deny | None:
    return next((s.deny for s in explanation.steps if s.detail == REPORTED), None)


def as_json(explanation: Explanation, method: str, url: str, config: Config) -> dict[str, object]:
    """`explain --json`: the same facts as `render`, for scripts. No secret appears in it."""
    result: dict[str, object] = {
        "request": {"method": method.upper(), "url": url},
        "steps": numbered_steps(explanation),
    }
    if explanation.reply is not None:
        result.update(verdict="reply", status=explanation.reply.status)
    elif explanation.allowed:
        result["verdict"] = "allow"
        result["forward"] = {
            "method": method.upper(),
            "url": explanation.forward_to,
            "client_credentials": "removed",
            "injected": injected_names(config),
        }
        reported = _reported(explanation)
        if reported is not None:
            result["would_deny"] = {"status": reported.status, "code": reported.code}
    else:
        d = _enforced_denial(explanation)
        result.update(verdict="deny", status=d.status, code=d.code, message=d.message)
    if config.rate_limits.store != "memory":
        result["note"] = "rate limits shown for a fresh bucket; live counters are in the store"
    return result


def render(explanation: Explanation, method: str, url: str, config: Config) -> str:
    lines = [f"request: {method.upper()} {url}"]
    steps = numbered_steps(explanation)
    width = max(len(f"{s['step']} {s['name']}") for s in steps)
    for s in steps:
        label = f"{s['step']} {s['name']}"
        if s["result"] == "deny":
            lines.append(f"  DENY  {label:<{width}}  {s['status']} {s['code']}: {s['detail']}")
        elif s["result"] == "would deny":
            lines.append(
                f"  WOULD {label:<{width}}  {s['status']} {s['code']}: {s['detail']} -- {REPORTED}"
            )
        elif s["result"] == "reply":
            lines.append(f"  REPLY {label:<{width}}  {s['detail']}")
        else:
            lines.append(f"  {s['result']:<4}  {label:<{width}}  {s['detail']}")
    if explanation.reply is not None:
        status = explanation.reply.status
        lines.append(f"verdict: REPLY {status} from keyproxy itself (no key, no upstream)")
    elif explanation.allowed:
        injected = injected_names(config)
        what = ", ".join(injected) if injected else "nothing"
        lines.append(f"verdict: ALLOW -> {method.upper()} {explanation.forward_to}")
        lines.append(f"         client credentials removed; injected: {what}")
        reported = _reported(explanation)
        if reported is not None:
            lines.append(f"         would deny (report mode): {reported.status} {reported.code}")
    else:
        d = _enforced_denial(explanation)
        lines.append(f"verdict: DENY {d.status} {d.code}")
    if config.rate_limits.store != "memory":
        lines.append("note: rate limits shown for a fresh bucket; live counters are in the store")
    return "\n".join(lines)
