"""The one canonical form of a request target (STUB: being implemented)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # canonical path: what routes match and what is forwarded
    query: str  # the query string without "?", forwarded as is ("" when none)
    segments: tuple[str, ...]  # the path split on "/", without the leading empty string


@dataclass(frozen=True, slots=True)
class InvalidPath:
    message: str


def canonicalize(raw_target: str) -> Target | InvalidPath:
    raise NotImplementedError
