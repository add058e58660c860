"""The configuration: the immutable model and the strict YAML loader.

The loader's names are imported on first use rather than here: `routes` and
`allowlists` import `keyproxy.config.model`, and the loader imports them, so
an eager import would make importing `keyproxy.policy.routes` first a cycle. It also
keeps YAML out of processes that only need the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyproxy.config.model import Config

if TYPE_CHECKING:
    from keyproxy.config.load import ConfigError, ConfigIssue, load_config, parse_config

__all__ = ["Config", "ConfigError", "ConfigIssue", "load_config", "parse_config"]

_FROM_LOAD = frozenset({"ConfigError", "ConfigIssue", "load_config", "parse_config"})


def __getattr__(name: str) -> Any:
    if name in _FROM_LOAD:
        from keyproxy.config import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
