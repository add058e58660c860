"""The decision: an ordered list of small checks, read top to bottom (docs/decision.md).

Each check takes the `RequestContext` and returns `None` to continue, a
`Deny`, or a `Reply` (an answer keyproxy gives itself: a CORS preflight). A
check may instead return an awaitable of the same (the rate limiter talks to a
store); the memory store answers synchronously so the common path
never suspends. The live server and `keyproxy explain` both run `Pipeline`,
so an explanation is the decision itself, replayed with a trace.

Report mode (`mode: report` on a key) lives here, once, rather than in each
check: a refusal from a check marked `reportable` is recorded on
`ctx.would_deny` (the first one only) and the remaining checks still run, so
the rate limiter keeps counting; the request then goes through. Refusals that
are not reportable are always enforced: the credential, and the route step,
since a request no route describes (or a path an upstream could read
differently) has nothing safe to forward.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from keyproxy.checks.access import check_acl, check_key_type
from keyproxy.checks.authenticate import authenticate
from keyproxy.checks.constraints import check_key_constraints
from keyproxy.checks.limits import RateLimitCheck
from keyproxy.checks.memo import DecisionMemo
from keyproxy.checks.permissions import OwnershipCheck, check_roles, check_scopes
from keyproxy.checks.route import match_route
from keyproxy.ratelimit import Limiter
from keyproxy.request import Deny, Reply, RequestContext
from keyproxy.response.cors import check_preflight, describe_preflight

Outcome = Deny | Reply | None
CheckFn = Callable[[RequestContext], Outcome | Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # what `explain` prints for this step
    run: CheckFn
    describe: Callable[[RequestContext], str]  # what the step established, when it passed
    reportable: bool = True  # a `mode: report` key only records this step's refusals


@dataclass(frozen=True, slots=True)
class StepOutcome:
    name: str
    deny: Deny | None
    detail: str
    reply: Reply | None = None  # the step answered the request itself


def build_checks(
    limiter: Limiter,
    owners: OwnershipCheck | None = None,
    limits: RateLimitCheck | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[Check, ...]:
    """Steps 1–8 in order, after the CORS preflight. `owners` reads records' owners from
    the upstream; `keyproxy explain` passes one that stays offline. `limits`: the server's
    long-lived rate-limit step (`keyproxy.services`), else one over `limiter`, whose
    buckets `clock` drives when given (`keyproxy replay` passes the logged request times)."""
    from keyproxy.checks import describe

    if limits is None:
        limits = RateLimitCheck(limiter) if clock is None else RateLimitCheck(limiter, clock)
    owners = owners if owners is not None else OwnershipCheck()
    return (
        Check("0 cors preflight", check_preflight, describe_preflight, reportable=False),
        Check("1 credential", authenticate, describe.credential, reportable=False),
        Check("2 key constraints", check_key_constraints, describe.constraints),
        Check("3 route", match_route, describe.route, reportable=False),
        Check("4 key type", check_key_type, describe.key_type),
        Check("5 acl", check_acl, describe.acl),
        Check("6 scopes", check_scopes, describe.scopes),
        Check("7 roles", check_roles, describe.roles),
        Check("7 self records", owners, describe.self_records),
        Check("8 rate limit", limits, limits.describe),
    )


class Pipeline:
    """The checks in order. `memo`: the live server's `DecisionMemo`, which lets a
    repeated request skip to the rate limit (`explain` and `replay` never pass one)."""

    __slots__ = ("checks", "memo", "memo_end")

    def __init__(self, checks: tuple[Check, ...], memo: DecisionMemo | None = None) -> None:
        self.checks = checks
        self.memo = memo
        #: The first check a memo hit still runs: the rate limit, which counts every request.
        self.memo_end = next(
            (i for i, check in enumerate(checks) if isinstance(check.run, RateLimitCheck)),
            len(checks),
        )

    def decide(
        self, ctx: RequestContext, memo_key: tuple[Any, ...] | None = None
    ) -> Deny | Reply | Awaitable[Deny | None] | None:
        """The verdict, or — when a check must wait (a remote rate-limit store) — an
        awaitable of it. Synchronous checks never pay for a coroutine."""
        checks = self.checks
        index = 0
        memo = self.memo
        remember = -1
        if memo is not None and memo_key is not None:
            if memo.recall(ctx, memo_key):
                index = self.memo_end
            else:
                remember = self.memo_end
        while index < len(checks):
            if index == remember:
                memo.remember(ctx, memo_key)  # type: ignore[union-attr,arg-type]  # set together above
            check = checks[index]
            outcome = check.run(ctx)
            if outcome is None:
                index += 1
                continue
            if outcome.__class__ is Deny:
                if check.reportable and _reporting(ctx):
                    return self._report(ctx, outcome, index)
                return outcome
            if outcome.__class__ is Reply:
                return outcome
            return self._decide_rest(ctx, outcome, index)  # type: ignore[arg-type]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it
        if index == remember:
            memo.remember(ctx, memo_key)  # type: ignore[union-attr,arg-type]  # set together above
        return None

    def _report(
        self, ctx: RequestContext, deny: Deny, index: int
    ) -> Deny | Awaitable[Deny | None] | None:
        """A `mode: report` key's refusal: record it and run the remaining checks."""
        checks = self.checks
        while True:
            if ctx.would_deny is None:
                ctx.would_deny = deny
            index += 1
            while index < len(checks):
                outcome = checks[index].run(ctx)
                if outcome is None:
                    index += 1
                    continue
                if outcome.__class__ is not Deny:
                    return self._decide_rest(ctx, outcome, index)  # type: ignore[arg-type]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it
                if not checks[index].reportable:
                    return outcome
                deny = outcome
                break
            else:
                return None

    async def _decide_rest(
        self, ctx: RequestContext, pending: Awaitable[Deny | None], index: int
    ) -> Deny | None:
        outcome = await pending
        checks = self.checks
        while True:
            if outcome is not None:
                if not (checks[index].reportable and _reporting(ctx)):
                    return outcome
                if ctx.would_deny is None:
                    ctx.would_deny = outcome
            index += 1
            if index == len(checks):
                return None
            outcome = checks[index].run(ctx)  # type: ignore[assignment]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it
            if outcome is not None and outcome.__class__ is not Deny:
                outcome = await outcome  # type: ignore[misc]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it

    async def trace(self, ctx: RequestContext) -> list[StepOutcome]:
        """Run the same checks, recording every step up to the first enforced denial.

        A `mode: report` key's refusals are recorded with the detail "would deny
        (report mode)" and the trace goes on, as the live decision does.
        """
        steps: list[StepOutcome] = []
        for check in self.checks:
            outcome = check.run(ctx)
            if outcome.__class__ is Reply:
                steps.append(StepOutcome(check.name, None, outcome.why, outcome))
                break
            if outcome is not None and outcome.__class__ is not Deny:
                outcome = await outcome  # type: ignore[misc]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it
            if outcome is not None:
                if check.reportable and _reporting(ctx):
                    if ctx.would_deny is None:
                        ctx.would_deny = outcome
                    steps.append(StepOutcome(check.name, outcome, REPORTED))
                    continue
                steps.append(StepOutcome(check.name, outcome, ""))
                break
            steps.append(StepOutcome(check.name, None, check.describe(ctx)))
        return steps


#: The detail of a step whose refusal was only recorded (`mode: report`).
REPORTED = "would deny (report mode)"


def _reporting(ctx: RequestContext) -> bool:
    key = ctx.key
    return key is not None and key.report
