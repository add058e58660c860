"""Route patterns and the compiled route table (STUB: being implemented)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keyproxy.config.model import Route


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class AmbiguousMatch:
    message: str


def parse_pattern(text: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """`"GET|PUT /{index}/_settings"` -> (methods, segments); ValueError(message) if invalid."""
    raise NotImplementedError


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        raise NotImplementedError

    def resolve(self, method: str, segments: tuple[str, ...]) -> RouteMatch | AmbiguousMatch | None:
        raise NotImplementedError
