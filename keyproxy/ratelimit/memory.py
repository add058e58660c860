"""The in-process store: GCRA buckets in a bounded LRU, quotas in a dict.

`hit` is a plain function, not a coroutine: it runs on the event loop thread
between awaits, so it is atomic without a lock and costs no task switch.

Bounds and their trade-off: buckets live in an LRU of `max_buckets`
entries, so a flood of distinct client addresses cannot grow memory without
limit. When the cache is full, the least recently used bucket is dropped, and a
dropped bucket starts full on its next request. Under such a flood the limits
therefore err towards letting requests through for clients that have been quiet
the longest; they never refuse a request that a larger cache would have allowed.

Scope: counts are per process. With `serve --workers N`, or several replicas,
each process limits on its own (N processes let up to N times the rate
through), and quotas restart from zero with the process. Use the Redis store
for limits shared across processes and quotas that outlive a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from keyproxy.ratelimit import (
    TOLERANCE,
    UNLIMITED,
    LimitResult,
    QuotaWindow,
    quota_exhausted,
    tightest,
)

if TYPE_CHECKING:
    from collections.abc import Hashable

    from keyproxy.config.model import Rate

#: LimitResult's NamedTuple constructor is a Python function; `tuple.__new__` builds the
#: same object at a third of the cost, which counts on every request.
_new_tuple = tuple.__new__


class MemoryLimiter:
    """GCRA per (key id, client IP) and a request count per key id, in this process.

    `now` is best taken from a monotonic clock (`time.monotonic()`, the loop's
    `time()`). Wall-clock seconds work too, but a clock step forward refills every
    bucket at once, and a step back empties them (for at most one period, see the
    clamp in `hit`). Times are stored relative to the first `now` seen, because a
    float's precision falls with its magnitude: at epoch seconds (1.7e9) it is
    0.24 µs, and a TAT built from thousands of additions of period/N would drift
    by more than the tolerance. Bursts stay exact up to thousands per second for
    months of process uptime; beyond that a burst may fall a request short.

    Not thread-safe: call it from the event loop thread only.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        # (key id, client IP) -> TAT: the `now` at which the bucket is full again.
        # An OrderedDict used as an LRU: its C methods cost a fraction of a Python cache's.
        # Further windows of a key with several (`[10/second, 1000/hour]`) are keyed
        # (key id, client IP, position); the first window shares the single rate's bucket.
        self._buckets: OrderedDict[Hashable, float] = OrderedDict()
        self._max_buckets = max_buckets
        # key id -> requests allowed so far. Bounded by the configured keys, since only
        # authenticated requests reach the limiter; kept for removed keys so a key that
        # is removed and re-added does not get a fresh quota.
        self._used: dict[str, int] = {}
        # key id -> (period label, requests allowed in it): a new period starts at zero.
        self._period_used: dict[str, tuple[str, int]] = {}
        self._epoch: float | None = None

    def __len__(self) -> int:
        """Number of buckets held (for tests and metrics)."""
        return len(self._buckets)

    def hit(
        self,
        key_id: str,
        client_ip: str,
        rate: Rate | tuple[Rate, ...] | None,
        quota: int | None,
        now: float,
        window: QuotaWindow | None = None,
    ) -> LimitResult:
        if rate is None:
            if quota is None:
                return UNLIMITED
            return self._quota_only(key_id, quota, window)
        if window is not None or rate.__class__ is tuple:
            return self._windows(key_id, client_ip, rate, quota, now, window)

        # A single window from here on. Rate is itself a tuple, so mypy cannot narrow on
        # the exact-class test above (an isinstance would cost on this hot path).
        single: Rate = rate  # type: ignore[assignment]
        epoch = self._epoch
        if epoch is None:
            epoch = self._epoch = now
        now -= epoch
        limit = single.limit
        period = single.period
        interval = period / limit
        bucket = (key_id, client_ip)
        buckets = self._buckets
        try:
            tat = buckets[bucket]
        except KeyError:
            tat = now
        else:
            buckets.move_to_end(bucket)  # refused clients too: eviction must not refill them
            if tat < now:
                tat = now
            elif tat > now + period:
                # The period was shortened by a reload: an empty bucket of the new size,
                # not a wait as long as the old period. Stored, since a refusal stores nothing.
                tat = buckets[bucket] = now + period

        # Requests the bucket holds right now (fractional: it refills continuously).
        available = (now + period - tat) / interval
        if available < 1.0 - TOLERANCE:
            return LimitResult(
                False,
                "rate",
                limit,
                0,
                tat - now,
                tat + interval - period - now,
                quota,
                None if quota is None else max(quota - self._used.get(key_id, 0), 0),
                None,
            )

        quota_remaining = None
        if quota is not None:
            used = self._used.get(key_id, 0)
            if used >= quota:
                return quota_exhausted(single, int(available + TOLERANCE), tat - now, quota)
            self._used[key_id] = used + 1
            quota_remaining = quota - used - 1

        tat += interval
        buckets[bucket] = tat  # a new key goes to the end; an existing one was moved there
        if len(buckets) > self._max_buckets:
            buckets.popitem(last=False)
        return _new_tuple(
            LimitResult,
            (
                True,
                None,
                limit,
                int(available - 1.0 + TOLERANCE),
                tat - now,
                0.0,
                quota,
                quota_remaining,
                None,
            ),
        )

    def _quota_only(self, key_id: str, quota: int, window: QuotaWindow | None) -> LimitResult:
        used = self._quota_used(key_id, window)
        if used >= quota:
            return quota_exhausted(None, None, None, quota, window)
        self._count(key_id, window, used + 1)
        return LimitResult(
            True,
            None,
            None,
            None,
            None,
            0.0,
            quota,
            quota - used - 1,
            None if window is None else window.reset_in,
        )

    def _quota_used(self, key_id: str, window: QuotaWindow | None) -> int:
        if window is None:
            return self._used.get(key_id, 0)
        label, used = self._period_used.get(key_id, ("", 0))
        return used if label == window.label else 0

    def _count(self, key_id: str, window: QuotaWindow | None, used: int) -> None:
        if window is None:
            self._used[key_id] = used
        else:
            self._period_used[key_id] = (window.label, used)

    def _windows(
        self,
        key_id: str,
        client_ip: str,
        rate: Rate | tuple[Rate, ...],
        quota: int | None,
        now: float,
        window: QuotaWindow | None,
    ) -> LimitResult:
        """Several windows and/or a refilling quota: the general form of `hit`.

        Every window is read first and a request is counted in all of them or in
        none, so a request refused by one window (or by the quota) costs the others
        nothing. The headers report the tightest window (see `tightest`); a refusal
        reports the window that must wait longest, since that is when a retry passes.
        """
        rates: tuple[Rate, ...] = rate if rate.__class__ is tuple else (rate,)  # type: ignore[assignment]  # Rate is a tuple too
        epoch = self._epoch
        if epoch is None:
            epoch = self._epoch = now
        now -= epoch
        buckets = self._buckets
        states = []
        refused = None
        for position, each in enumerate(rates):
            bucket: Hashable = (
                (key_id, client_ip) if position == 0 else (key_id, client_ip, position)
            )
            period = each.period
            interval = period / each.limit
            tat = buckets.get(bucket, now)
            if bucket in buckets:
                buckets.move_to_end(bucket)
            if tat < now:
                tat = now
            elif tat > now + period:
                tat = buckets[bucket] = now + period
            available = (now + period - tat) / interval
            states.append((bucket, tat, interval, available, each))
            if available < 1.0 - TOLERANCE:
                retry = tat + interval - period - now
                if refused is None or retry > refused[0]:
                    refused = (retry, each, tat - now)
        used = 0 if quota is None else self._quota_used(key_id, window)
        quota_reset = None if window is None else window.reset_in
        if refused is not None:
            retry, each, reset = refused
            return LimitResult(
                False,
                "rate",
                each.limit,
                0,
                reset,
                retry,
                quota,
                None if quota is None else max(quota - used, 0),
                quota_reset if quota is not None else None,
            )
        if quota is not None and used >= quota:
            pick = tightest(
                [
                    (int(available + TOLERANCE), tat - now, i)
                    for i, (_, tat, _, available, _) in enumerate(states)
                ]
            )
            _, tat, _, available, each = states[pick]
            return quota_exhausted(each, int(available + TOLERANCE), tat - now, quota, window)
        candidates = []
        for position, (bucket, tat, interval, available, _) in enumerate(states):
            tat += interval
            buckets[bucket] = tat
            candidates.append((int(available - 1.0 + TOLERANCE), tat - now, position))
        while len(buckets) > self._max_buckets:
            buckets.popitem(last=False)
        quota_remaining = None
        if quota is not None:
            self._count(key_id, window, used + 1)
            quota_remaining = quota - used - 1
        remaining, reset, pick = candidates[tightest(candidates)]
        return LimitResult(
            True,
            None,
            rates[pick].limit,
            remaining,
            reset,
            0.0,
            quota,
            quota_remaining,
            quota_reset if quota is not None else None,
        )

    async def aclose(self) -> None:
        """Nothing to release; present so callers treat every store alike."""
