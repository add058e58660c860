"""`${VAR}` is read only in fields for secrets and addresses, and never echoed."""

from __future__ import annotations

import pytest

from keyproxy.config import ConfigError, parse_config

BASE = 'upstream:\n  url: http://127.0.0.1:3000\nroutes:\n  - {match: "GET /a", acl: a}\n'


def _issues(text: str, env: dict[str, str]) -> list:
    try:
        parse_config(text, "e.yaml", env)
    except ConfigError as error:
        return error.issues
    return []


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (BASE.replace("acl: a}", "acl: '${SECRET}'}"), "routes[0].acl"),
        (BASE.replace("GET /a", "GET /${SECRET}"), "routes[0].match"),
        (BASE + "  - {match: 'POST /a', acl: '${SECRET}'}\n", "routes[1].acl"),
        (BASE + "server:\n  query_param: ${SECRET}\n", "server.query_param"),
        (BASE + "server:\n  max_body: ${SECRET}\n", "server.max_body"),
        (BASE.replace("3000\n", "3000\n  timeout: ${SECRET}\n"), "upstream.timeout"),
    ],
)
def test_a_variable_outside_secret_and_address_fields_is_refused(text: str, where: str) -> None:
    (issue,) = _issues(text, {"SECRET": "s3cr3t-value"})
    assert issue.where == where
    assert "not read in this field" in issue.message and "${SECRET}" in issue.message
    assert "upstream.inject" in (issue.hint or "")
    assert "s3cr3t-value" not in str(issue)


@pytest.mark.parametrize(
    "text",
    [
        BASE.replace("http://127.0.0.1:3000", "${URL}"),
        BASE.replace("3000\n", "3000\n  inject: {headers: {X-Key: '${SECRET}'}}\n"),
        BASE.replace("3000\n", "3000\n  inject: {query: {key: '${SECRET}'}}\n"),
        BASE + "server:\n  listen: ${LISTEN}\n  admin_listen: ${ADMIN}\n",
        BASE + "rate_limits:\n  store: ${STORE}\n",
    ],
)
def test_secret_and_address_fields_read_the_environment(text: str) -> None:
    env = {
        "URL": "http://127.0.0.1:3000",
        "SECRET": "s3cr3t-value",
        "LISTEN": "127.0.0.1:8080",
        "ADMIN": "127.0.0.1:9901",
        "STORE": "redis://127.0.0.1:6379/0",
    }
    assert _issues(text, env) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (BASE.replace("http://127.0.0.1:3000", "${URL}"), "http://h:port-s3cr3t"),
        (BASE.replace("http://127.0.0.1:3000", "${URL}"), "ftp://s3cr3t@host"),
        (BASE + "server:\n  listen: ${LISTEN}\n", "s3cr3t-host:99999"),
        (BASE + "rate_limits:\n  store: ${LISTEN}\n", "mongodb://s3cr3t@h"),
    ],
)
def test_an_expanded_value_is_never_echoed(text: str, value: str) -> None:
    issues = _issues(text, {"URL": value, "LISTEN": value})
    assert issues
    for issue in issues:
        assert "s3cr3t" not in str(issue), issue


def test_a_value_quoted_in_an_issue_about_another_field_is_not_echoed() -> None:
    text = BASE + "server:\n  listen: ${LISTEN}\n  admin_listen: 0.0.0.0:8080\n"
    (issue,) = _issues(text, {"LISTEN": "10.9.8.7:8080"})
    assert issue.where == "server.admin_listen"
    assert "10.9.8.7" not in str(issue) and "(${LISTEN})" in issue.message
