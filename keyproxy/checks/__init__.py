"""The decision: an ordered list of small checks, read top to bottom (SPEC §3).

Each check takes the `RequestContext` and returns `None` to continue, a
`Deny`, or a `Reply` (an answer keyproxy gives itself: a CORS preflight). A
check may instead return an awaitable of the same (the rate limiter talks to a
store); the memory store answers synchronously so the common path
never suspends. The live server and `keyproxy explain` both run `Pipeline`,
so an explanation is the decision itself, replayed with a trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from keyproxy.checks.access import check_acl, check_key_type
from keyproxy.checks.authenticate import authenticate
from keyproxy.checks.constraints import check_key_constraints
from keyproxy.checks.limits import RateLimitCheck
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


@dataclass(frozen=True, slots=True)
class StepOutcome:
    name: str
    deny: Deny | None
    detail: str
    reply: Reply | None = None  # the step answered the request itself


def build_checks(limiter: Limiter) -> tuple[Check, ...]:
    """Steps 1–8 in order, after the CORS preflight. Steps 6 (scopes) and 7 (roles) arrive
    with their sections."""
    from keyproxy.checks import describe

    limits = RateLimitCheck(limiter)
    return (
        Check("0 cors preflight", check_preflight, describe_preflight),
        Check("1 credential", authenticate, describe.credential),
        Check("2 key constraints", check_key_constraints, describe.constraints),
        Check("3 route", match_route, describe.route),
        Check("4 key type", check_key_type, describe.key_type),
        Check("5 acl", check_acl, describe.acl),
        Check("8 rate limit", limits, limits.describe),
    )


class Pipeline:
    __slots__ = ("checks",)

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks

    def decide(self, ctx: RequestContext) -> Deny | Reply | Awaitable[Deny | None] | None:
        """The verdict, or — when a check must wait (a remote rate-limit store) — an
        awaitable of it. Synchronous checks never pay for a coroutine."""
        for check in self.checks:
            outcome = check.run(ctx)
            if outcome is None:
                continue
            if outcome.__class__ is Deny or outcome.__class__ is Reply:
                return outcome  # type: ignore[return-value]
            return self._decide_rest(ctx, outcome, self.checks.index(check) + 1)  # type: ignore[arg-type]
        return None

    async def _decide_rest(
        self, ctx: RequestContext, pending: Awaitable[Deny | None], start: int
    ) -> Deny | None:
        outcome = await pending
        if outcome is not None:
            return outcome
        for check in self.checks[start:]:
            result = check.run(ctx)
            if result is not None and result.__class__ is not Deny:
                result = await result  # type: ignore[misc]
            if result is not None:
                return result  # type: ignore[return-value]
        return None

    async def trace(self, ctx: RequestContext) -> list[StepOutcome]:
        """Run the same checks, recording every step up to the first denial."""
        steps: list[StepOutcome] = []
        for check in self.checks:
            outcome = check.run(ctx)
            if outcome.__class__ is Reply:
                steps.append(StepOutcome(check.name, None, outcome.why, outcome))  # type: ignore[union-attr]
                break
            if outcome is not None and outcome.__class__ is not Deny:
                outcome = await outcome  # type: ignore[misc]
            if outcome is not None:
                steps.append(StepOutcome(check.name, outcome, ""))  # type: ignore[arg-type]
                break
            steps.append(StepOutcome(check.name, None, check.describe(ctx)))
        return steps
