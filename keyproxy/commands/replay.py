"""`keyproxy replay`: what would this configuration change break, on real traffic?

Every line of a keyproxy access log is turned back into a `RequestContext` and
decided again by the same `Pipeline` the server runs, under the candidate
configuration. The log holds no secret, so the caller is vouched for
(`RequestContext.vouched`: the key by its logged id, the user and the token's
roles as logged) and step 1 still refuses a key the candidate removed, revoked
or expired. Rate limits and quotas run on a memory store whose clock is the
logged request time, fed in log order.

What the log does not carry cannot be replayed exactly, and is said so rather
than guessed: requests refused at step 1 without a key (no key id), refusals
that depended on the request's other headers or on an end-user token that
failed, and owner checks that read the record from the upstream keep their
logged verdict and are counted apart. Query values are never logged: a
placeholder stands in for them. A Referer is logged as its origin only.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import gc
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.permissions import OwnershipCheck
from keyproxy.config.model import Config, RateLimitSettings
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, Reply, RequestContext, Vouched

#: What stands in for a query value or a key: values are never logged. Shaped like a
#: key (printable, long enough) so a key sent in the query is read as one.
PLACEHOLDER = "replay-placeholder-value"
HOST = ("host", "replay")
#: Examples kept per group of changes.
EXAMPLES = 3
#: Bad lines quoted in the report (all are counted).
BAD_EXAMPLES = 5

#: Step 1 refusals: with a key id logged, what failed was the end user's token (which
#: is never logged), so the refusal cannot be re-decided.
CREDENTIAL_CODES = frozenset(
    {"UNAUTHORIZED", "INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED", "AMBIGUOUS_CREDENTIALS"}
)
#: Refusals decided on request parts the log does not carry (other headers, the
#: body's framing, timing): kept as logged.
UNLOGGED_INPUT_CODES = frozenset(
    {
        "BAD_REQUEST",
        "EXPECTATION_FAILED",
        "HEADERS_TOO_LARGE",
        "INVALID_FORWARDED_FOR",
        "METHOD_OVERRIDE_NOT_ALLOWED",
        "REQUEST_TIMEOUT",
        "UPGRADE_NOT_ALLOWED",
        "NOT_FOUND",
    }
)
#: Refusals after the decision allowed the request (the upstream, the body, the
#: response filter): for replay the decision said allow.
AFTER_DECISION_CODES = frozenset(
    {
        "UPSTREAM_UNAVAILABLE",
        "UPSTREAM_TIMEOUT",
        "PAYLOAD_TOO_LARGE",
        "FILTER_FAILED",
        "INTERNAL_ERROR",
    }
)
VERDICTS = frozenset({"allow", "deny", "would_deny"})


@dataclass(slots=True)
class Group:
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ReplayResult:
    lines: int = 0  # non-empty lines read
    replayed: int = 0  # decided again under the candidate
    unchanged: int = 0
    no_key: int = 0  # refused at step 1 without a key id
    credential: int = 0  # refused at step 1 for the end user's token
    kept: int = 0  # decided on input the log lacks: kept as logged
    bad_lines: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)
    #: (before, after, key id, route, reason) -> the requests that changed so
    groups: dict[tuple[str, str, str, str, str], Group] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(g.count for g in self.groups.values())


def _epoch(stamp: str, seconds: dict[str, float]) -> float:
    """Log time ("2026-12-04T06:07:00.123Z") to epoch seconds; whole seconds are remembered."""
    head = stamp[:19]
    base = seconds.get(head)
    if base is None:
        if len(seconds) > 100_000:
            seconds.clear()
        base = seconds[head] = float(calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")))
    rest = stamp[19:]
    if rest[:1] == ".":
        return base + int(rest[1:4]) / 1000
    return base


class Replayer:
    """One pipeline, one memory limiter and one clock for a whole log."""

    def __init__(self, config: Config, examples: int = EXAMPLES) -> None:
        self.config = config
        self.examples = examples
        self._now = 0.0
        limiter = open_limiter(RateLimitSettings(max_buckets=config.rate_limits.max_buckets))
        self.pipeline = Pipeline(
            build_checks(limiter, OwnershipCheck(online=False), clock=self._clock)
        )
        self.result = ReplayResult()
        self._seconds: dict[str, float] = {}
        self._credentials: dict[tuple[str | None, str], tuple[tuple[str, str], ...]] = {}
        self._vouched: dict[tuple[str, str | None], Vouched] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _clock(self) -> float:
        return self._now

    def _credential(self, source: str | None, key_id: str) -> tuple[tuple[str, str], ...]:
        """The request's headers that the decision reads, with a placeholder for the key."""
        if source == "header":
            return (HOST, ("x-api-key", PLACEHOLDER))
        if source == "basic":
            raw = f"{key_id}:{PLACEHOLDER}".encode()
            return (HOST, ("authorization", "Basic " + base64.b64encode(raw).decode()))
        return (HOST,)  # "query": the parameter's name is among the logged query names

    def feed(self, lines: Iterable[bytes]) -> ReplayResult:
        result = self.result
        loads, replay_one = orjson.loads, self._replay
        # Millions of short-lived dicts and contexts, none of them in a cycle: the cyclic
        # collector would only walk them over and over.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for number, line in enumerate(lines, 1):
                if len(line) < 3 and not line.strip():
                    continue
                result.lines += 1
                try:
                    replay_one(loads(line), number)
                except Exception as exc:  # one bad line is reported, never the end of the run
                    self._bad(number, _why(exc))
        finally:
            if collecting:
                gc.enable()
        return result

    def _bad(self, number: int, why: str) -> None:
        result = self.result
        result.bad_lines += 1
        if len(result.bad_examples) < BAD_EXAMPLES:
            result.bad_examples.append((number, why))

    def _replay(self, record: dict[str, Any], number: int) -> None:
        result = self.result
        key_id = record["key"]
        decision = record["decision"]
        if decision not in VERDICTS:
            raise ValueError(f"unknown decision {decision!r}")
        if key_id is None or key_id == "-":
            result.no_key += 1
            return
        if key_id.__class__ is not str:
            raise ValueError("key is not a string")
        reason = record.get("reason")
        before = decision
        if decision == "deny":
            if reason in CREDENTIAL_CODES:
                result.credential += 1
                return
            if reason in UNLOGGED_INPUT_CODES:
                result.kept += 1
                return
            if reason in AFTER_DECISION_CODES:
                before = "allow"
        method = record["method"]
        path = record["path"]
        if method.__class__ is not str or path.__class__ is not str or path[:1] != "/":
            raise ValueError("method or path missing")
        when = _epoch(record["time"], self._seconds)
        names = record.get("query_names")
        if names:
            target = (
                path
                + "?"
                + "&".join(f"{n}={method if n == '_method' else PLACEHOLDER}" for n in names)
            )
        else:
            target = path
        source = record.get("credential_source")
        credential = self._credentials.get((source, key_id))
        if credential is None:
            credential = self._credentials[(source, key_id)] = self._credential(source, key_id)
        origin = record.get("referer_origin")
        headers = [*credential, ("referer", origin + "/")] if origin else list(credential)
        user = record.get("user")
        key_hash = record.get("key_hash")
        if user is None:
            vouched = self._vouched.get((key_id, key_hash))
            if vouched is None:
                vouched = self._vouched[(key_id, key_hash)] = Vouched(key_id, None, (), key_hash)
        else:
            roles = record.get("user_roles")
            vouched = Vouched(key_id, user, tuple(roles) if roles else (), key_hash)
        ctx = RequestContext(
            self.config,
            method,
            target,
            Headers.from_lowered(headers),
            record["client_ip"],
            when,
            record.get("request_id") or "",
        )
        ctx.vouched = vouched
        self._now = when
        outcome = self.pipeline.decide(ctx)
        if outcome is not None and outcome.__class__ is not Deny and outcome.__class__ is not Reply:
            outcome = self._wait(outcome)
        result.replayed += 1
        if outcome is None:
            route = ctx.route
            if ctx.self_only and route is not None and route.op != "list" and before == "deny":
                # The live owner check read the record upstream; offline it cannot.
                result.replayed -= 1
                result.kept += 1
                return
            after = "allow" if ctx.would_deny is None else "would_deny"
            new_reason = None if ctx.would_deny is None else ctx.would_deny.code
        elif outcome.__class__ is Reply:
            after, new_reason = "allow", None
        else:
            after, new_reason = "deny", outcome.code  # type: ignore[union-attr]
        if after == before:
            result.unchanged += 1
            return
        route_name = ctx.route.match if ctx.route is not None else (record.get("route") or "-")
        why = new_reason if after != "allow" else (reason or "-")
        group_key = (before, after, key_id, route_name, why or "-")
        group = result.groups.get(group_key)
        if group is None:
            group = result.groups[group_key] = Group()
        group.count += 1
        if len(group.examples) < self.examples:
            group.examples.append(
                {
                    "line": number,
                    "time": record["time"],
                    "request_id": record.get("request_id"),
                    "method": method,
                    "path": path,
                    "query_names": names or [],
                    "client_ip": record["client_ip"],
                    "user": user,
                    "before": {
                        "decision": decision,
                        "reason": reason,
                        "status": record.get("status"),
                    },
                    "after": _after(outcome, after, new_reason),
                }
            )

    def _wait(self, pending: Any) -> Deny | Reply | None:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(pending)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


def _after(outcome: Deny | Reply | None, after: str, reason: str | None) -> dict[str, Any]:
    if outcome.__class__ is Deny:
        assert isinstance(outcome, Deny)
        return {
            "decision": "deny",
            "reason": outcome.code,
            "status": outcome.status,
            "message": outcome.message,
        }
    return {"decision": after, "reason": reason}


def _why(exc: Exception) -> str:
    if isinstance(exc, orjson.JSONDecodeError):
        return "not a JSON line"
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, TypeError | AttributeError):
        return "not an access-log record"
    if isinstance(exc, ValueError):
        return str(exc) or "not an access-log record"
    return f"cannot be decided ({type(exc).__name__})"


def read_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The log's lines, read in large blocks (a line per `readline` costs more)."""
    yield from stream


def replay(config: Config, lines: Iterable[bytes], examples: int = EXAMPLES) -> ReplayResult:
    replayer = Replayer(config, examples)
    try:
        return replayer.feed(lines)
    finally:
        replayer.close()


# -- reports ----------------------------------------------------------------------


def _sorted_groups(result: ReplayResult) -> list[tuple[tuple[str, str, str, str, str], Group]]:
    return sorted(result.groups.items(), key=lambda item: (-item[1].count, item[0]))


def as_json(result: ReplayResult, log: str, config_path: str) -> dict[str, Any]:
    """`replay --json`: for CI pipelines. Holds ids, routes, paths and codes, never a secret."""
    counts: dict[str, int] = {}
    for (before, after, *_), group in result.groups.items():
        name = f"{before}_to_{after}"
        counts[name] = counts.get(name, 0) + group.count
    return {
        "log": log,
        "config": config_path,
        "changed": result.changed,
        "summary": {
            "lines": result.lines,
            "replayed": result.replayed,
            "unchanged": result.unchanged,
            "changed": result.changed,
            **counts,
            "not_replayable": {
                "no_key": result.no_key,
                "credential_refused": result.credential,
                "kept_as_logged": result.kept,
            },
            "bad_lines": result.bad_lines,
        },
        "changes": [
            {
                "from": before,
                "to": after,
                "key": key_id,
                "route": route,
                "reason": reason,
                "count": group.count,
                "examples": group.examples,
            }
            for (before, after, key_id, route, reason), group in _sorted_groups(result)
        ],
        "bad_lines": [{"line": n, "error": why} for n, why in result.bad_examples],
    }


def render(result: ReplayResult, log: str, config_path: str) -> str:
    out = [
        f"replayed {result.replayed} of {result.lines} requests from {log} under {config_path}:"
        f" {result.changed} would change, {result.unchanged} unchanged"
    ]
    for (before, after, key_id, route, reason), group in _sorted_groups(result):
        out.append(
            f"  {before} -> {after}  {group.count:>6}  key {key_id}  route {route}  {reason}"
        )
        for ex in group.examples:
            query = "?" + "&".join(ex["query_names"]) if ex["query_names"] else ""
            user = f" user {ex['user']}" if ex["user"] else ""
            detail = ex["after"].get("message") or ""
            out.append(
                f"      line {ex['line']}  {ex['time']}  {ex['method']} {ex['path']}{query}"
                f"  from {ex['client_ip']}{user}" + (f": {detail}" if detail else "")
            )
    skipped = []
    if result.no_key:
        skipped.append(f"{result.no_key} no key")
    if result.credential:
        skipped.append(f"{result.credential} end-user token refused")
    if result.kept:
        skipped.append(f"{result.kept} decided on what the log does not hold (kept as logged)")
    if skipped:
        out.append("not replayable: " + ", ".join(skipped))
    if result.bad_lines:
        shown = "; ".join(f"line {n}: {why}" for n, why in result.bad_examples)
        out.append(f"bad lines: {result.bad_lines} skipped ({shown})")
    if not result.changed:
        out.append("no verdict changes")
    return "\n".join(out)


def run(config_path: str, log_path: str, as_json_output: bool) -> int:
    """The command: 0 nothing changes, 1 something does, 2 the input cannot be read."""
    from keyproxy.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        first = exc.issues[0].format(exc.source) if exc.issues else f"{config_path}: refused"
        more = (
            f" (and {len(exc.issues) - 1} more: run keyproxy check)" if len(exc.issues) > 1 else ""
        )
        print(first + more, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{config_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        stream = sys.stdin.buffer if log_path == "-" else open(log_path, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"{log_path}: cannot read the access log: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        with stream:
            result = replay(config, read_lines(stream))
    except OSError as exc:
        print(f"{log_path}: cannot read the access log: {exc.strerror}", file=sys.stderr)
        return 2
    if result.lines and result.bad_lines == result.lines:
        print(
            f"{log_path}: no line is a keyproxy access-log record ({result.bad_lines} bad lines;"
            f" line {result.bad_examples[0][0]}: {result.bad_examples[0][1]})",
            file=sys.stderr,
        )
        return 2
    if as_json_output:
        sys.stdout.buffer.write(
            orjson.dumps(as_json(result, log_path, config_path), option=orjson.OPT_INDENT_2) + b"\n"
        )
    else:
        print(render(result, log_path, config_path))
    return 1 if result.changed else 0
