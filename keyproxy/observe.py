"""Seeing it run: the per-request metrics and the JSON access log, fed from one call.

Every exchange ends in `Observer.exchange_finished`, whether keyproxy answered it
itself (a refusal, an upstream error) or forwarded it and the answer completed or
was cut off. That one call counts it and queues its access-log line, so the
metrics and the log can never disagree about a request.

Why plain dicts and not `prometheus_client`'s `labels().inc()`: a labelled
`inc()` takes a lock and looks the child up through the label tuple on every
call (about 1 µs each, and a request touches three families), whereas a dict
increment keyed by the label tuple costs a tenth of that. The counts become
Prometheus families only when `/metrics` is scraped, through a custom collector
(`MetricsCollector`) and `prometheus_client.generate_latest`. Histograms are
arrays of bucket counts, made cumulative at scrape time.

Cardinality is bounded by construction:
- `key` is a configured key id, never a presented key: a request whose key was
  not recognised is labelled `-`. Only the first `metrics.per_key` distinct key
  ids seen by a process get their own label; every later one counts as `_other`.
- `route` is the matched route's pattern as written in the file (`-` if none).
- `method` is one of the HTTP methods a route may name, else `OTHER`.
- `status` is the status code answered (499 when the client left first).

The API for other parts of keyproxy (cheap, never blocking, callable anywhere
in the process; all through the module-level `metrics` object)::

    from keyproxy.observe import metrics
    metrics.jwks_refresh("success")       # or "error": keyproxy_jwks_refreshes_total{result}
    metrics.cache("hit")                  # hit | miss | bypass: keyproxy_cache_requests_total
    metrics.fields_memo("hit")            # hit | miss | bypass: keyproxy_fields_memo_requests_total
    metrics.would_deny(key_id, "ACL")     # report mode: keyproxy_would_deny_total{key,reason}

A request decided in report mode is logged with `decision: would_deny` when its
`RequestContext` carries a `would_deny` attribute holding the `Deny` that
enforce mode would have answered (its `code` becomes the log line's `reason`);
`user` and `roles` are taken from the context the same way when present.

With `serve --workers N` every worker writes a snapshot of its counts to the
directory named by `KEYPROXY_METRICS_DIR` (set by the supervisor) once a second;
the worker that answers a scrape adds the other workers' snapshots to its own
live counts, so one scrape shows every worker (a snapshot is at most a second
old; the counts of a worker that died stay in the sum, as counters must).

The access log never holds a key, a JWT, a query value, a Basic password or the
upstream secret: it records the query's parameter *names*, the Referer's
*origin*, the credential's *source*, the key's *id* and which of its hashes was used
(`key_hash`: "sha256:" and 8 hex digits of the digest, never the key).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import io
import ipaddress
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import IO, TYPE_CHECKING, Any

import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from keyproxy.config.model import ROUTE_METHODS
from keyproxy.observability import log_event

if TYPE_CHECKING:
    from keyproxy.config.model import Config, Key
    from keyproxy.request import RequestContext
    from keyproxy.wire.exchange import Exchange

#: Bucket bounds in seconds: fine below 10 ms, where a proxy's own latency lives.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
KNOWN_METHODS = frozenset(ROUTE_METHODS)
NO_KEY = "-"
OTHER_KEYS = "_other"
RATE_LIMIT_CODES = frozenset({"RATE_LIMITED", "QUOTA_EXCEEDED"})
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"
#: Access-log records kept while the writer is behind; beyond it lines are dropped and counted.
MAX_PENDING = 200_000
FLUSH_INTERVAL = 0.5
#: Access-log lines serialised between two pauses of the writer thread (~0.3 ms of work),
#: and the pause, in which the event loop's thread has the CPU and the GIL (`AccessLog`).
LINES_PER_SLICE = 128
SLICE_PAUSE = 0.001
SNAPSHOT_INTERVAL = 1.0
METRICS_DIR_ENV = "KEYPROXY_METRICS_DIR"


class Metrics:
    """This process's counts, as plain dicts and ints (see the module docstring)."""

    def __init__(self, per_key: int = 100) -> None:
        self.per_key = per_key
        self._key_labels: dict[str, str] = {}
        self._own_labels = 0
        self.requests: dict[tuple[str, str, str, int, str], int] = {}
        self.denials: dict[str, int] = {}
        self.would_denies: dict[tuple[str, str], int] = {}
        self.cache_results: dict[str, int] = {}
        self.fields_memo_results: dict[str, int] = {}
        self.jwks_refreshes: dict[str, int] = {}
        self.rate_limited = 0
        self.access_log_dropped = 0
        self.request_buckets = [0] * (len(BUCKETS) + 1)
        self.request_sum = 0.0
        self.upstream_buckets = [0] * (len(BUCKETS) + 1)
        self.upstream_sum = 0.0
        self.reloads: dict[str, int] = {}

    def key_label(self, key_id: str | None) -> str:
        """The label for a configured key id: its own for the first `per_key` seen."""
        if key_id is None:
            return NO_KEY
        label = self._key_labels.get(key_id)
        if label is None:
            if self._own_labels < self.per_key:
                label = key_id
                self._own_labels += 1
            else:
                label = OTHER_KEYS
            # Only configured key ids get here, so this map is bounded by the key list.
            self._key_labels[key_id] = label
        return label

    # -- the API for other parts of keyproxy -----------------------------------
    def jwks_refresh(self, result: str) -> None:
        self.jwks_refreshes[result] = self.jwks_refreshes.get(result, 0) + 1

    def cache(self, result: str) -> None:
        self.cache_results[result] = self.cache_results.get(result, 0) + 1

    def fields_memo(self, result: str) -> None:
        self.fields_memo_results[result] = self.fields_memo_results.get(result, 0) + 1

    def would_deny(self, key_id: str | None, reason: str) -> None:
        labels = (self.key_label(key_id), reason)
        self.would_denies[labels] = self.would_denies.get(labels, 0) + 1

    # -- snapshots, for --workers ----------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The counts as JSON-ready data (summed across workers by `merge`)."""
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "denials": dict(self.denials),
            "would_deny": [[*k, v] for k, v in self.would_denies.items()],
            "cache": dict(self.cache_results),
            "fields_memo": dict(self.fields_memo_results),
            "jwks": dict(self.jwks_refreshes),
            "reloads": dict(self.reloads),
            "rate_limited": self.rate_limited,
            "access_log_dropped": self.access_log_dropped,
            "request_buckets": list(self.request_buckets),
            "request_sum": self.request_sum,
            "upstream_buckets": list(self.upstream_buckets),
            "upstream_sum": self.upstream_sum,
        }


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum snapshots of several processes into one of the same shape."""
    total: dict[str, Any] = {
        "requests": {},
        "denials": {},
        "would_deny": {},
        "cache": {},
        "fields_memo": {},
        "jwks": {},
        "reloads": {},
        "rate_limited": 0,
        "access_log_dropped": 0,
        "request_buckets": [0] * (len(BUCKETS) + 1),
        "request_sum": 0.0,
        "upstream_buckets": [0] * (len(BUCKETS) + 1),
        "upstream_sum": 0.0,
    }
    for snap in snapshots:
        for name in ("requests", "would_deny"):
            into = total[name]
            for *labels, value in snap.get(name, ()):
                key = tuple(str(v) for v in labels)
                into[key] = into.get(key, 0) + value
        for name in ("denials", "cache", "fields_memo", "jwks", "reloads"):
            into = total[name]
            for label, value in snap.get(name, {}).items():
                into[label] = into.get(label, 0) + value
        for name in ("rate_limited", "access_log_dropped", "request_sum", "upstream_sum"):
            total[name] += snap.get(name, 0)
        for name in ("request_buckets", "upstream_buckets"):
            counts = snap.get(name) or []
            if len(counts) == len(BUCKETS) + 1:
                total[name] = [a + b for a, b in zip(total[name], counts, strict=True)]
    return total


def _histogram(name: str, doc: str, counts: list[int], total: float) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], buckets, total)
    return family


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def key_states(config: Config, now: float) -> dict[str, int]:
    states = {"active": 0, "expired": 0, "revoked": 0, "report": 0}
    for key in config.keys:
        if key.revoked:
            states["revoked"] += 1
        elif key.expires_at is not None and key.expires_at <= now:
            states["expired"] += 1
        else:
            states["active"] += 1
        if key.report:
            states["report"] += 1
    return states


class MetricsCollector(Collector):
    """Turns the plain counts into Prometheus families when `/metrics` is scraped."""

    def __init__(self, observer: Observer, own: dict[str, Any]) -> None:
        self.observer = observer
        self.own = own  # this process's counts, taken on the loop (the dicts change there)

    def collect(self) -> Iterator[Metric]:
        observer = self.observer
        data = merge([self.own, *observer.other_snapshots()])
        requests = CounterMetricFamily(
            "keyproxy_requests",
            "Requests answered, by key id, route pattern, method, status and decision.",
            labels=["key", "route", "method", "status", "decision"],
        )
        for (key, route, method, status, decision), count in sorted(data["requests"].items()):
            requests.add_metric([key, route, method, str(status), decision], count)
        yield requests
        yield _counter(
            "keyproxy_denials", "Requests refused, by reason code.", "reason", data["denials"]
        )
        yield _histogram(
            "keyproxy_request_duration_seconds",
            "Time from a request's head to the end of its answer.",
            data["request_buckets"],
            data["request_sum"],
        )
        yield _histogram(
            "keyproxy_upstream_duration_seconds",
            "Time from sending a request upstream to the end of the upstream's answer.",
            data["upstream_buckets"],
            data["upstream_sum"],
        )
        yield CounterMetricFamily(
            "keyproxy_rate_limited",
            "Requests refused by a rate limit or a quota.",
            value=data["rate_limited"],
        )
        yield _counter(
            "keyproxy_cache_requests", "Response cache lookups, by result.", "result", data["cache"]
        )
        yield _counter(
            "keyproxy_fields_memo_requests",
            "Answers to filter, by whether the memo of filtered answers had them "
            "(hit, miss, or bypass: too large to keep).",
            "result",
            data["fields_memo"],
        )
        reloads = {"success": 0, "error": 0, **data["reloads"]}
        yield _counter(
            "keyproxy_config_reloads", "Configuration reloads, by result.", "result", reloads
        )
        keys = GaugeMetricFamily("keyproxy_keys", "Configured keys, by state.", labels=["state"])
        for state, count in key_states(observer.config, time.time()).items():
            keys.add_metric([state], count)
        yield keys
        would = CounterMetricFamily(
            "keyproxy_would_deny",
            "Report-mode requests enforce mode would have refused, by key id and reason.",
            labels=["key", "reason"],
        )
        for (key, reason), count in sorted(data["would_deny"].items()):
            would.add_metric([key, reason], count)
        yield would
        yield _counter(
            "keyproxy_jwks_refreshes", "JWKS fetches, by result.", "result", data["jwks"]
        )
        yield CounterMetricFamily(
            "keyproxy_access_log_dropped",
            "Access-log lines dropped because the log could not be written (fast enough).",
            value=data["access_log_dropped"],
        )


#: At shutdown, how long the access log's writer may take to write its last lines.
CLOSE_TIMEOUT = 5.0


class LogWriter(Executor):
    """One daemon thread that runs the submitted writes in order.

    Not a `ThreadPoolExecutor`: its threads are joined when the interpreter exits, so a
    write blocked for good (a named pipe whose reader died, a stalled log shipper on
    stdout) would keep the process from ever stopping.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        # Not `_thread`: compiled by mypyc (bench/compiled.py), that is a C keyword.
        self._runner = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._runner.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, run = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(run())
                except BaseException as exc:
                    future.set_exception(exc)

    def finish(self, timeout: float) -> bool:
        """Run what was submitted, then stop; whether that took less than `timeout` seconds."""
        self._calls.put(None)
        self._runner.join(timeout)
        return not self._runner.is_alive()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._calls.put(None)
        if wait:
            self._runner.join()


class AccessLog:
    """JSON lines, queued on the loop and written by one thread.

    `add` is all a request pays on the loop: appending a tuple. Every
    `FLUSH_INTERVAL` the queue is handed to a single writer thread that turns it
    into JSON (orjson) and writes it, so neither a large batch nor a slow pipe
    or disk stalls the event loop, and lines keep their order.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.pending: list[tuple[Any, ...]] = []
        self._writer = LogWriter()
        self._in_flight: asyncio.Future[None] | None = None
        self._file: IO[bytes] | None = None
        self._reopen = False
        self.dropped = 0
        #: Lines whose write failed (counted by the writer thread).
        self.lost = 0
        #: `dropped + lost` as last added to `keyproxy_access_log_dropped_total`.
        self.counted = 0

    def add(self, record: tuple[Any, ...]) -> None:
        self.pending.append(record)

    def reopen(self) -> None:
        """SIGUSR1: the file was rotated; the next write opens the path afresh."""
        self._reopen = True

    def _moved(self, file: IO[bytes]) -> bool:
        """Whether the path no longer names the open file: logrotate renamed or removed it
        and signalled nothing, or SIGHUP, as most daemons are told. Lines written on into the
        rotated file would go with it when it is compressed and deleted. One stat per flush,
        on the writer thread."""
        try:
            now = os.stat(self.target)
        except OSError:
            return True
        opened = os.fstat(file.fileno())
        return (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev)

    def _write(self, data: bytes) -> bool:
        """Whether `data` was written (a full disk, an unwritable path: logged, not raised)."""
        try:
            if self.target == "stdout":
                out = sys.stdout.buffer
            elif self.target == "stderr":
                out = sys.stderr.buffer
            else:
                if self._reopen or self._file is None or self._moved(self._file):
                    self._reopen = False
                    if self._file is not None:
                        # None before the open: if it fails, the next write tries again
                        # rather than use the closed file for good.
                        closing = self._file
                        self._file = None
                        closing.close()
                    self._file = open(self.target, "ab")  # noqa: SIM115 (kept open)
                out = self._file
            out.write(data)
            out.flush()
        except (OSError, ValueError) as exc:
            log_event("access_log_error", target=self.target, error=str(exc))
            return False
        return True

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.pending:
            return
        if self._in_flight is not None and not self._in_flight.done():
            # The writer is behind: keep queuing, within a bound.
            excess = len(self.pending) - MAX_PENDING
            if excess > 0:
                del self.pending[:excess]
                self.dropped += excess
            return
        records, self.pending = self.pending, []
        # Serialised on the writer thread too: a flush never holds the loop for the batch.
        self._in_flight = loop.run_in_executor(self._writer, self._write_records, records)

    def _write_records(self, records: list[tuple[Any, ...]]) -> None:
        data = lines(records[:LINES_PER_SLICE])
        if len(records) > LINES_PER_SLICE:
            # A flush at 13,000 req/s is ~6,700 lines, ~14 ms of Python (2 µs a line) on the
            # proxy's CPU and under the GIL: in one go, requests arriving meanwhile waited
            # up to the interpreter's 5 ms switch interval. Pausing between slices hands the
            # CPU and the GIL back to the event loop. The full policy's p99 under load
            # (`wrk -c32`, two runs each): 9.5 ms in one go, 5.0-5.3 ms in slices, 3.0-3.2
            # ms with the log off.
            parts = [data]
            for start in range(LINES_PER_SLICE, len(records), LINES_PER_SLICE):
                time.sleep(SLICE_PAUSE)
                parts.append(lines(records[start : start + LINES_PER_SLICE]))
            data = b"".join(parts)
        if not self._write(data):
            self.lost += len(records)  # on the writer thread: apart from `dropped`

    def close(self) -> None:
        """At shutdown: write everything still queued, then stop the writer; a writer
        blocked on a pipe nobody reads is given up after `CLOSE_TIMEOUT`, so SIGTERM ends."""
        if self.pending:
            records, self.pending = self.pending, []
            self._writer.submit(self._write_records, records)
        if not self._writer.finish(CLOSE_TIMEOUT):
            log_event(
                "access_log_stuck",
                target=self.target,
                message=f"the access log could not be written for {CLOSE_TIMEOUT:g}s; "
                "stopping without its last lines",
            )
            return  # the file is the stuck thread's: closing it under it would not unblock it
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()


def _referer_origin(referer: str | None) -> str | None:
    if not referer:
        return None
    scheme, sep, rest = referer.partition("://")
    if not sep:
        return None
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host = host.rpartition("@")[2]  # never userinfo (it may hold a password)
    return f"{scheme.lower()}://{host.lower()}"


#: Longest query parameter name logged: a longer one is dropped, not cut (a prefix of a
#: pasted secret is still a secret).
MAX_LOGGED_NAME = 64
#: Generated key prefixes: a name starting with one is a pasted key, never logged.
_KEY_PREFIXES = ("pk_", "sk_")


def _query_names(query: str | None) -> list[str] | None:
    """Names of the `name=value` items only: a value-less item (`?pk_...`) may be a key
    pasted into the URL, so it is never logged, nor a name that is long or looks like one."""
    if not query:
        return None
    names = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        if sep and name and len(name) <= MAX_LOGGED_NAME and not name.startswith(_KEY_PREFIXES):
            names.append(name)
    return names or None


#: A generated key's prefix where a word begins (so not `task_`), its `_` raw or
#: percent-encoded, and the rest of the path segment after it.
_PASTED_KEY = re.compile(r"(?<![A-Za-z0-9])([ps]k)(?:_|%5[fF])[^/]*")


def _path_without_keys(path: str) -> str:
    """The path with a generated key cut to its prefix wherever a path segment holds one
    (`/v1/pk_.../posts`, `/echo/key=pk_...`, `pk%5F...`): a client that pastes its key
    into the URL must not find it in the log. Runs once per verdict, on the writer thread."""
    if "k_" not in path and "k%5" not in path:
        return path
    return _PASTED_KEY.sub(r"\1_***", path)


def unread_target(target: str) -> tuple[str, str]:
    """The path and query of a request target keyproxy did not read (refused before or at
    its path), as they may be logged: without the `user:password@` of an absolute or
    authority form (up to its last `@`, whatever the password holds), the path cut after
    a `;` or `#`. Clients put passwords in userinfo and keys in `;api_key=` parameters and
    fragments, and the log holds neither; what is left still shows why it was refused."""
    if target[:1] != "/" or target[1:2] == "/":
        slashes = target.find("//")
        begin = slashes + 2 if slashes >= 0 else 0
        at = target.rfind("@", begin)
        if at >= 0:
            target = f"{target[:begin]}***{target[at:]}"
    path, _, query = target.partition("?")
    for mark in (";", "#"):
        cut = path.find(mark)
        if cut >= 0:
            path = path[: cut + 1]
    return path, query


def admin_exposure(host: str) -> str | None:
    """A warning when `server.admin_listen` is not on loopback: its /metrics names key
    ids (and /healthz, /readyz the process state) to whoever reaches that address."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"server.admin_listen is on {host}, not loopback: /metrics (which names key ids) is "
        "reachable from that network; bind it to 127.0.0.1 or firewall the port"
    )


#: Referer -> origin, remembered: a site's pages send a handful of distinct referers.
_origins: dict[str, str | None] = {}
_ORIGINS_MAX = 4096


class Verdict:
    """What the metrics and the log line say of one verdict, apart from the request's own
    figures (time, id, status, bytes, durations).

    A remembered verdict's repeats share it (`RequestContext.notes`), so a repeat pays
    for its labels and the JSON of its sixteen fields once; a fresh verdict makes one.
    The JSON is made by the log's writer (`lines`), the first time a line needs it: the
    loop only keeps the fields, and with the access log off nothing is serialised.
    """

    __slots__ = ("fields", "head", "labels", "tail")

    def __init__(self, labels: tuple[str, str, str], fields: tuple[Any, ...]) -> None:
        #: key, route and method labels of `keyproxy_requests_total`.
        self.labels = labels
        #: `describe_verdict`'s arguments from `key` on, for `serialise`.
        self.fields = fields
        #: The log line's fields from `key` to `reason`, as JSON object members between
        #: commas; None until `serialise` has run.
        self.head: bytes | None = None
        #: The fields from `referer_origin` to `key_hash` after a comma, with the closing
        #: brace and the newline.
        self.tail = b""

    def serialise(self) -> bytes:
        """Make `head` and `tail` and return `head`. Only the log's writer calls it; should
        two callers race, both write the same bytes, `tail` before `head`."""
        try:
            return self._serialise(self.fields)
        except orjson.JSONEncodeError:
            # A string orjson will not write (a lone surrogate, which Python strings can
            # hold): the line is written with it escaped rather than the batch lost.
            return self._serialise(tuple(_writable(field) for field in self.fields))

    def _serialise(self, fields: tuple[Any, ...]) -> bytes:
        (
            key, user, client_ip, method, path, route, decision, reason, referer, source,
            query, roles, user_roles,
        ) = fields  # fmt: skip
        origin = None
        if referer:
            origin = _origins.get(referer, "")
            if origin == "":
                if len(_origins) >= _ORIGINS_MAX:
                    _origins.clear()
                origin = _origins[referer] = _referer_origin(referer)
        head = orjson.dumps(
            {
                "key": key.id if key is not None else None,
                "user": user,
                "client_ip": client_ip if client_ip.__class__ is str else str(client_ip),
                "method": method,
                "path": _path_without_keys(path),
                "route": route,
                "decision": decision,
                "reason": reason,
            }
        )
        tail = orjson.dumps(
            {
                "referer_origin": origin,
                "credential_source": source,
                "query_names": _query_names(query),
                "roles": None if roles is None else list(roles),
                # The verified token's own roles, apart from the key's: replay re-decides
                # steps 6-7 under a candidate that may change the key's roles.
                "user_roles": list(user_roles) if user_roles else None,
                # Which of the key's hashes was presented (a label, never the key): so a
                # rotation's progress shows, and replay can tell an old hash from the new.
                "key_hash": None
                if key is None
                else key.rotation.label
                if key.rotation is not None
                else "sha256:" + key.digest[:4].hex(),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self.tail = b"," + tail[1:]
        members = self.head = b"," + head[1:-1] + b","
        return members


def _writable(value: Any) -> Any:
    """`value` with every string made encodable as UTF-8 (lone surrogates as `\\udXXX`)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, tuple):
        return tuple(_writable(item) for item in value)
    return value


def describe_verdict(
    key_label: str,
    key: Key | None,
    user: str | None,
    client_ip: object,
    method: str,
    path: str,
    route: str | None,
    decision: str,
    reason: str | None,
    referer: str | None,
    source: str | None,
    query: str | None,
    roles: tuple[str, ...] | None,
    user_roles: tuple[str, ...] | None,
) -> Verdict:
    """The verdict's labels now; its log fields kept as they are, serialised only when
    a line is written (`Verdict.serialise`)."""
    labels = (key_label, route or "-", method if method in KNOWN_METHODS else "OTHER")
    return Verdict(
        labels,
        (
            key, user, client_ip, method, path, route, decision, reason, referer, source,
            query, roles, user_roles,
        ),
    )  # fmt: skip


def lines(records: list[tuple[Any, ...]]) -> bytes:
    """The queued records as JSON lines, in one loop (this runs once per flush).

    A line is the request's own figures written around its verdict's JSON (made once
    per `Verdict`, by orjson), in the order the fields have always had. The figures are
    numbers, keyproxy's own hex request id and a timestamp, none of which JSON escapes,
    so they are formatted directly: one format per line instead of two dicts and two
    serialiser calls (the bytes are orjson's, which a test holds).
    """
    # Each line is written into one buffer and dropped at once: keeping thousands of
    # small bytes objects alive until a join costs more than serialising them.
    buffer = io.BytesIO()
    write = buffer.write
    second, stamp = -1, b""
    for when, request_id, status, sent, upstream_s, total_s, verdict in records:
        whole = int(when)
        if whole != second:
            second = whole
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode()
        head = verdict.head
        if head is None:
            head = verdict.serialise()
        write(
            _LINE
            % (
                stamp,
                int((when - whole) * 1000),
                request_id.encode(),
                head,
                status,
                sent,
                b"null" if upstream_s is None else b"%r" % (int(upstream_s * 1e6) / 1000),
                int(total_s * 1e6) / 1000,
                verdict.tail,
            )
        )
    return buffer.getvalue()


#: A log line: time, request id, the verdict's members, status, bytes, the two durations
#: in milliseconds (floats written as `repr`, which is orjson's shortest form too), then
#: the verdict's closing members.
_LINE = (
    b'{"time":"%s.%03dZ","request_id":"%s"%s"status":%d,"bytes":%d,"upstream_ms":%s,"total_ms":%r%s'
)


class Observer:
    """One per process: what `Exchange._finish` reports to, and what `/metrics` reads."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.config = config
        self.metrics = metrics
        metrics.per_key = config.metrics.per_key
        self.access_log: AccessLog | None = (
            None if config.log.access == "off" else AccessLog(config.log.access)
        )
        self.metrics_dir = os.environ.get(METRICS_DIR_ENV) or None
        self._behind_proxies = config.server.trusted_proxies is not None
        self._tasks: list[asyncio.Task[None]] = []

    def on_config(self, config: Config) -> None:
        self.config = config
        self._behind_proxies = config.server.trusted_proxies is not None
        metrics.per_key = config.metrics.per_key
        target = config.log.access
        current = self.access_log
        if current is not None and current.target == target:
            return
        if current is not None:
            current.flush(self.loop)
            self.loop.run_in_executor(None, current.close)  # after its last lines
        self.access_log = None if target == "off" else AccessLog(target)

    def reopen_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def start(self) -> None:
        self._tasks.append(self.loop.create_task(self._flush_forever()))
        if self.metrics_dir is not None:
            self._tasks.append(self.loop.create_task(self._snapshot_forever()))

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            log = self.access_log
            if log is not None:
                log.flush(self.loop)
                # Added, not assigned: a reload that moves the log starts a new one at 0.
                now_dropped = log.dropped + log.lost
                metrics.access_log_dropped += now_dropped - log.counted
                log.counted = now_dropped

    async def _snapshot_forever(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            data = orjson.dumps(metrics.snapshot())
            await self.loop.run_in_executor(None, self._write_snapshot, data)

    def _snapshot_path(self, pid: int) -> str:
        assert self.metrics_dir is not None
        return os.path.join(self.metrics_dir, f"{pid}.json")

    def _write_snapshot(self, data: bytes) -> None:
        path = self._snapshot_path(os.getpid())
        try:
            with open(path + ".tmp", "wb") as out:
                out.write(data)
            os.replace(path + ".tmp", path)  # readers never see half a snapshot
        except OSError as exc:
            log_event("metrics_snapshot_error", error=str(exc))

    def other_snapshots(self) -> list[dict[str, Any]]:
        """Every other worker's latest snapshot (none without --workers)."""
        snaps: list[dict[str, Any]] = []
        if self.metrics_dir is None:
            return snaps
        own = f"{os.getpid()}.json"
        try:
            names = os.listdir(self.metrics_dir)
        except OSError:
            return snaps
        for name in names:
            if name == own or not name.endswith(".json") or not name[:-5].isdigit():
                continue  # not another worker's snapshot
            try:
                with open(os.path.join(self.metrics_dir, name), "rb") as f:
                    snaps.append(orjson.loads(f.read()))
            except (OSError, orjson.JSONDecodeError):
                continue
        return snaps

    def registry(self) -> CollectorRegistry:
        """A registry for one scrape. Call on the loop: it copies this process's counts;
        rendering it (reading other workers' files) may then run on a thread."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self, metrics.snapshot()))
        return registry

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.access_log is not None:
            self.access_log.close()
        if self.metrics_dir is not None:
            self._write_snapshot(orjson.dumps(metrics.snapshot()))

    # -- the hot path: once per exchange ----------------------------------------
    def exchange_finished(self, ex: Exchange) -> None:
        """Count `ex` and queue its log line; a fault here must never cost the connection."""
        try:
            self._record(ex)
        except Exception as exc:
            log_event("observe_error", request_id=ex.request_id, error=type(exc).__name__)

    def _record(self, ex: Exchange) -> None:
        now = time.perf_counter()  # the clock of the exchange's stamps
        total = now - ex.started
        m = metrics
        ctx = ex.ctx
        status = ex.status or CLIENT_CLOSED
        reason = ex.reason
        if ctx is None:
            path, query = unread_target(ex.target)
            when = time.time()
            decision = "deny"
            verdict = describe_verdict(
                NO_KEY, None, None, ex.conn.peer_ip, ex.method, path, None, decision, reason,
                None, None, query, None, None,
            )  # fmt: skip
        else:
            when = ctx.now
            decision = "deny"
            if ex.allowed:
                decision = "allow"
                would = ctx.would_deny
                if would is not None:
                    decision = "would_deny"
                    reason = getattr(would, "code", str(would))
                    key = ctx.key
                    m.would_deny(key.id if key is not None else None, reason)
            notes = ctx.notes
            seen: Verdict | None = notes.get((decision, reason)) if notes is not None else None
            if seen is None:
                seen = self._describe(ex, ctx, decision, reason)
                if notes is not None:  # the same for every repeat of this verdict
                    notes[(decision, reason)] = seen
            verdict = seen
        requests = m.requests
        labels = (*verdict.labels, status, decision)
        requests[labels] = requests.get(labels, 0) + 1
        if decision == "deny" and reason is not None:
            m.denials[reason] = m.denials.get(reason, 0) + 1
            if reason in RATE_LIMIT_CODES:
                m.rate_limited += 1
        m.request_buckets[bisect.bisect_left(BUCKETS, total)] += 1
        m.request_sum += total
        upstream = None
        if ex.upstream_started:
            upstream = now - ex.upstream_started
            m.upstream_buckets[bisect.bisect_left(BUCKETS, upstream)] += 1
            m.upstream_sum += upstream
        log = self.access_log
        if log is not None:
            log.pending.append((when, ex.request_id, status, ex.sent, upstream, total, verdict))

    def _describe(
        self, ex: Exchange, ctx: RequestContext, decision: str, reason: str | None
    ) -> Verdict:
        key = ctx.key
        target = ctx.target
        if target is not None:
            path, query = target.path, target.query
        else:
            path, query = unread_target(ex.target)
        # The socket peer unless trusted proxies name another (an address object: str()ed).
        client_ip = ctx.client_ip if self._behind_proxies and ctx.client_ip else ctx.peer_ip
        return describe_verdict(
            metrics.key_label(key.id if key is not None else None),
            key,
            ctx.user,
            client_ip,
            ex.method,
            path,
            ctx.route.match if ctx.route is not None else None,
            decision,
            reason,
            ctx.headers.get("referer"),
            ctx.credential_source,
            query,
            ctx.roles,
            ctx.token_roles,
        )


#: The process's counts: see the module docstring for the calls other parts may make.
metrics = Metrics()
