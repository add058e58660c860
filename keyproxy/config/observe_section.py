"""The `log` and `metrics` sections: where access-log lines go, how many key ids label metrics."""

from __future__ import annotations

from yaml.nodes import Node

from keyproxy.config.model import LogSettings, MetricsSettings
from keyproxy.config.yaml_reader import Reader

_LOG_FIELDS = frozenset({"access"})
_METRICS_FIELDS = frozenset({"per_key"})


def read_log(r: Reader, node: Node | None) -> LogSettings | None:
    if node is None:
        return LogSettings()
    fields = r.fields(node, "log", _LOG_FIELDS)
    if fields is None:
        return None
    if "access" not in fields:
        return LogSettings()
    value = r.text(fields["access"], "log.access")
    if value is None:
        return None
    if not value.strip() or "\0" in value:
        r.issue(
            fields["access"],
            "log.access",
            "expected stdout, stderr, off or a file path",
            "write stdout, stderr, off, or an absolute path such as /var/log/keyproxy/access.log",
        )
        return None
    return LogSettings(access=value)


def read_metrics(r: Reader, node: Node | None) -> MetricsSettings | None:
    if node is None:
        return MetricsSettings()
    fields = r.fields(node, "metrics", _METRICS_FIELDS)
    if fields is None:
        return None
    if "per_key" not in fields:
        return MetricsSettings()
    per_key = r.integer(fields["per_key"], "metrics.per_key", 0, 10_000)
    if per_key is None:
        return None
    return MetricsSettings(per_key=per_key)
