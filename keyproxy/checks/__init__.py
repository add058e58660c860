"""The decision: an ordered list of small checks, read top to bottom (SPEC §3).

Each check takes the `RequestContext` and returns `None` to continue or a
`Deny`. A check may instead return an awaitable of the same (the rate limiter
talks to a store); the memory store answers synchronously so the common path
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
from keyproxy.checks.permissions import OwnershipCheck, check_roles, check_scopes
from keyproxy.checks.route import match_route
from keyproxy.ratelimit import Limiter
from keyproxy.request import Deny, RequestContext

Outcome = Deny | None
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


def build_checks(limiter: Limiter, owners: OwnershipCheck | None = None) -> tuple[Check, ...]:
    """SPEC §3 steps 1–8 in order. `owners` reads records' owners from the upstream;
    `keyproxy explain` passes one that stays offline."""
    from keyproxy.checks import describe

    limits = RateLimitCheck(limiter)
    owners = owners if owners is not None else OwnershipCheck()
    return (
        Check("1 credential", authenticate, describe.credential),
        Check("2 key constraints", check_key_constraints, describe.constraints),
        Check("3 route", match_route, describe.route),
        Check("4 key type", check_key_type, describe.key_type),
        Check("5 acl", check_acl, describe.acl),
        Check("6 scopes", check_scopes, describe.scopes),
        Check("7 roles", check_roles, describe.roles),
        Check("7 self records", owners, describe.self_records),
        Check("8 rate limit", limits, limits.describe),
    )


class Pipeline:
    __slots__ = ("checks",)

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks

    def decide(self, ctx: RequestContext) -> Deny | Awaitable[Deny | None] | None:
        """The verdict, or — when a check must wait (a remote rate-limit store) — an
        awaitable of it. Synchronous checks never pay for a coroutine."""
        for check in self.checks:
            outcome = check.run(ctx)
            if outcome is None:
                continue
            if outcome.__class__ is Deny:
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
            if outcome is not None and outcome.__class__ is not Deny:
                outcome = await outcome  # type: ignore[misc]
            if outcome is not None:
                steps.append(StepOutcome(check.name, outcome, ""))  # type: ignore[arg-type]
                break
            steps.append(StepOutcome(check.name, None, check.describe(ctx)))
        return steps
