"""A browser app on its own origin calling keyproxy with `fetch`, checked in real Chromium.

This is the first user's story: a page on one origin sends a publishable key in
`X-API-Key` plus a custom header, which makes Chromium send a CORS preflight
first. keyproxy must answer that preflight itself (it carries no key), then let
the script read the rate-limit headers of the real answer and the JSON body of
a refusal. The same page served from a second origin must not get through:
its preflight is refused, so `fetch` itself fails and nothing reaches the upstream.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from tests.procs import start_upstream
from tests.proxy_process import base_config, digest, start_keyproxy
from tests.test_browser import BrowserRun, PageServer, chromium, run_chromium

__all__ = ["chromium"]  # the fixture, shared with the referer browser test

pytestmark = pytest.mark.slow

UPSTREAM_SECRET = "cors-browser-upstream-secret-42"
APP_KEY = "pk_" + "d" * 64
SLOTS = ("read", "remaining", "filtered", "refusal", "refusal_id")


def app_page(proxy_url: str, key: str, page: str) -> str:
    """Two fetches: an allowed read with a custom header, then a route the key cannot use."""
    slots = "\n".join(f'<p id="{name}">pending</p>' for name in SLOTS)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>keyproxy cors test</title></head>
<body>
{slots}
<script>
function put(name, value) {{ document.getElementById(name).textContent = value; }}
const headers = {{"X-API-Key": "{key}", "X-Trace": "trace-{page}"}};
async function run() {{
  try {{
    const answer = await fetch("{proxy_url}/echo/app?page={page}", {{headers}});
    const body = await answer.json();
    put("read", answer.status + " " + body.path);
    put("remaining", answer.headers.get("X-RateLimit-Remaining") ?? "unreadable");
  }} catch (error) {{
    put("read", "fetch failed"); put("remaining", "fetch failed");
  }}
  try {{
    const answer = await fetch("{proxy_url}/shaped/object?page={page}", {{headers}});
    const record = await answer.json();
    put("filtered", answer.status + " " + Object.keys(record).sort().join(",")
        + " author:" + Object.keys(record.author).sort().join(","));
  }} catch (error) {{
    put("filtered", "fetch failed");
  }}
  try {{
    const refused = await fetch("{proxy_url}/not-a-route?page={page}", {{headers}});
    const body = await refused.json();
    put("refusal", refused.status + " " + body.error);
    put("refusal_id", refused.headers.get("X-Request-Id") === body.requestId ? "same" : "differs");
  }} catch (error) {{
    put("refusal", "fetch failed"); put("refusal_id", "fetch failed");
  }}
}}
run();
</script>
</body></html>
"""


def slot(run: BrowserRun, name: str) -> str:
    match = re.search(rf'<p id="{name}">(.*?)</p>', run.dom)
    assert match, f"no slot {name!r} in the DOM of {run.url}:\n{run.dom}"
    value = html.unescape(match.group(1))
    assert value != "pending", f"{name!r} never settled on {run.url}"
    return value


@dataclass
class Scenario:
    origin_a: str
    runs: dict[str, BrowserRun]
    records: list[dict[str, Any]]


@pytest.fixture(scope="module")
def scenario(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    stoppers: list[Callable[[], object]] = []
    try:
        upstream = start_upstream(header_secrets={"X-Upstream-Key": UPSTREAM_SECRET})
        stoppers.append(upstream.stop)
        page_a, page_b = PageServer("127.0.0.1"), PageServer("127.0.0.2")
        stoppers += [page_a.stop, page_b.stop]
        config = base_config(upstream.url, upstream.inject())
        config["keys"].append(
            {
                "id": "app",
                "hash": digest(APP_KEY),
                "type": "read",
                "referers": [f"{page_a.origin}/*"],
                "rate_limit": "100/minute",
                "fields": {"exclude": ["email", "author.phone"]},
            }
        )
        config["routes"].append({"match": "GET /shaped/{shape}", "acl": "get"})
        config["cors"] = {"allow_origins": [page_a.origin], "max_age": 60}
        kp = start_keyproxy(tmp_path_factory.mktemp("browser-cors"), config)
        stoppers.append(kp.stop)
        page_a.pages["/app.html"] = app_page(kp.url, APP_KEY, "a")
        page_b.pages["/app.html"] = app_page(kp.url, APP_KEY, "b")
        urls = {"a": f"{page_a.origin}/app.html", "b": f"{page_b.origin}/app.html"}
        with ThreadPoolExecutor(len(urls)) as pool:
            futures = {name: pool.submit(run_chromium, chromium, url) for name, url in urls.items()}
            runs = {name: future.result() for name, future in futures.items()}
        yield Scenario(page_a.origin, runs, upstream.records())
    finally:
        for stop in reversed(stoppers):
            stop()


def test_allowed_origin_reads_through_the_preflight(scenario: Scenario) -> None:
    """The preflight passed (else fetch fails), and the referer-checked read came back."""
    assert slot(scenario.runs["a"], "read") == "200 /echo/app"


def test_script_reads_the_rate_limit_headers(scenario: Scenario) -> None:
    assert slot(scenario.runs["a"], "remaining") == "99"


def test_the_referer_checked_read_is_filtered_for_the_key(scenario: Scenario) -> None:
    """The key hides email and author.phone: the browser never receives them."""
    assert slot(scenario.runs["a"], "filtered") == ("200 author,createdBy,id,title author:name")


def test_script_reads_why_it_was_refused(scenario: Scenario) -> None:
    assert slot(scenario.runs["a"], "refusal") == "403 ROUTE_NOT_ALLOWED"
    assert slot(scenario.runs["a"], "refusal_id") == "same"


def test_other_origin_cannot_call_at_all(scenario: Scenario) -> None:
    run = scenario.runs["b"]
    assert slot(run, "read") == "fetch failed"
    assert slot(run, "refusal") == "fetch failed"
    assert slot(run, "filtered") == "fetch failed"


def test_upstream_saw_one_read_with_the_custom_header_and_never_the_key(
    scenario: Scenario,
) -> None:
    records = scenario.records
    assert [r["raw_path"] for r in records] == [
        "/echo/app?page=a",
        "/shaped/object?page=a",
    ], records
    headers = {name.lower(): value for name, value in records[0]["headers"]}
    assert headers["x-trace"] == "trace-a"
    assert headers["origin"] == scenario.origin_a
    assert APP_KEY not in repr(records)


def test_the_demo_page_tells_the_browser_story(chromium: str) -> None:
    """`keyproxy demo` prints a page URL: opened in Chromium, its script reads the browser
    key's filtered posts, the rate-limit header and a refusal's JSON, through the preflight."""

    from tests.procs import free_port, start_demo

    port = free_port()
    with start_demo(port) as proc:
        page = re.search(r"open (http://127\.0\.0\.1:\d+/)", proc.stdout)
        assert page is not None, proc.stdout
        run = run_chromium(chromium, page.group(1))
        read = re.search(r'<pre id="read">(.*?)</pre>', run.dom, re.S)
        assert read is not None and read.group(1).startswith("200"), run.dom
        posts = html.unescape(read.group(1))
        assert '"author"' in posts and '"phone"' not in posts and '"email"' not in posts
        remaining = re.search(r'<b id="remaining">(\d+)</b>', run.dom)
        assert remaining is not None, run.dom
        refusal = re.search(r'<pre id="refusal">(.*?)</pre>', run.dom, re.S)
        assert refusal is not None and refusal.group(1).startswith("403"), run.dom
        assert "PERMISSION_DENIED" in html.unescape(refusal.group(1))
