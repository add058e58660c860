"""The browser story, checked with a real headless Chromium (a key's `referers`, decision step 2).

A read key is only safe to put in a web page if keyproxy can tell where the
call comes from, and the only witness it has is the `Referer` a browser chooses
to send. What browsers send is not what people assume: since Chromium 85 the
default policy is strict-origin-when-cross-origin, so a page on another origin
sends its origin plus "/" and never its path. Hand-written Referer headers in
the other tests cannot prove that a real browser's request is allowed from the
right page and refused everywhere else; only a real browser can.

The test serves pages from two origins, lets Chromium load a script from
keyproxy with the key in the query (no CORS preflight, so it works before CORS
is built), and reads three witnesses: the page's DOM (what the page saw), a
byte-for-byte relay in front of keyproxy (what Chromium sent and what keyproxy
answered: a page cannot read a cross-origin response, and keyproxy has no
access log yet) and the recording upstream (what got through).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import base_config, digest, start_keyproxy

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMIUM_TIMEOUT = 15.0  # wall clock per browser run; a hung browser fails, never hangs pytest
VIRTUAL_TIME_BUDGET_MS = 5000  # page time Chromium may spend; it ends early once the page idles

UPSTREAM_SECRET = "browser-upstream-secret-0123456789"
WEB_KEY = "pk_" + "b" * 64  # referers: the whole origin of page server A
PATH_KEY = "pk_" + "c" * 64  # referers: only the pages under /shop/ on A

# text/plain, so a 200 really runs as a script (onload) while keyproxy's JSON 403 fires
# onerror; a JSON 200 would fire onerror too, because Chromium blocks cross-origin JSON
# in a script tag (ORB), and the page could no longer tell allowed from refused.
RESOURCE = "/chunked/0?delay_ms=0"


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = f"no Chromium binary ({', '.join(CHROMIUM_NAMES)}); apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser test (.ci/run installs it)")
        pytest.skip(reason)
    return path


# -- page servers -------------------------------------------------------------------------


class PageServer:
    """A static HTML server on its own origin, in a thread of the test process.

    Bound to port 0 before keyproxy's config is written, so the origin that goes
    into the key's `referers` is the real one and no port can be taken meanwhile.
    """

    def __init__(self, host: str) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = pages.get(urlsplit(self.path).path)
                body = (page or "not found").encode()
                self.send_response(200 if page is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://{host}:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def page_html(scripts: dict[str, str], meta: str = "") -> str:
    """A page that loads each script and writes `loaded` or `error` into `<p id=NAME>`.

    `pending` left in the DOM means the load never settled within the budget.
    """
    slots = "\n".join(f'<p id="{name}">pending</p>' for name in scripts)
    tags = "\n".join(
        f"<script src=\"{src}\" onload=\"settle('{name}', 'loaded')\" "
        f"onerror=\"settle('{name}', 'error')\"></script>"
        for name, src in scripts.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{meta}<title>keyproxy browser test</title></head>
<body>
{slots}
<script>
function settle(name, outcome) {{ document.getElementById(name).textContent = outcome; }}
</script>
{tags}
</body></html>
"""


# -- the relay in front of keyproxy ---------------------------------------------------------


@dataclass
class Exchange:
    """One request as Chromium put it on the wire, and keyproxy's answer to it."""

    target: str
    headers: dict[str, str]  # lower-case names
    status: int
    response_headers: dict[str, str]
    body: bytes

    @property
    def page(self) -> str:
        return parse_qs(urlsplit(self.target).query).get("page", ["?"])[0]


class _Replay:
    """Just enough of a socket for `http.client.HTTPResponse` to parse recorded bytes.

    Every response on a kept-alive connection is read from the same buffer, so
    the buffer must survive `HTTPResponse` closing it after each body.
    """

    class _Buffer(io.BytesIO):
        def close(self) -> None:
            pass

    def __init__(self, data: bytes) -> None:
        self.file = self._Buffer(data)
        self.size = len(data)

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return self.file

    def responses(self) -> Iterator[tuple[http.client.HTTPResponse, bytes]]:
        while self.file.tell() < self.size:
            response = http.client.HTTPResponse(self)  # type: ignore[arg-type]
            response.begin()
            yield response, response.read()


class WireTap:
    """A byte-for-byte TCP relay that keeps a copy of both directions.

    It changes nothing on the way, so what it records is exactly what Chromium
    sent and what keyproxy answered, including refusals the page cannot read.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conversations: list[tuple[bytearray, bytearray]] = []
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            sent, answered = bytearray(), bytearray()
            pumps = [
                threading.Thread(target=self._pump, args=(client, server, sent), daemon=True),
                threading.Thread(target=self._pump, args=(server, client, answered), daemon=True),
            ]
            with self._lock:
                self._conversations.append((sent, answered))
                self._sockets += [client, server]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, copy: bytearray) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    copy += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def exchanges(self) -> list[Exchange]:
        """Every request Chromium sent, with keyproxy's answer, in order per connection.

        Connections Chromium opened speculatively and never used are left out.
        """
        with self._lock:
            conversations = [(bytes(s), bytes(a)) for s, a in self._conversations if s]
        result = []
        for sent, answered in conversations:
            # GETs only: a request ends at its blank line
            heads = sent.split(b"\r\n\r\n")
            assert heads.pop() == b"", f"a request was cut off or had a body: {sent!r}"
            responses = list(_Replay(answered).responses())
            assert len(responses) == len(heads), f"{len(heads)} requests, {len(responses)} answers"
            for head, (response, body) in zip(heads, responses, strict=True):
                request_line, *lines = head.decode("latin-1").split("\r\n")
                _, target, _ = request_line.split(" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                result.append(
                    Exchange(
                        target,
                        headers,
                        response.status,
                        {k.lower(): v for k, v in response.getheaders()},
                        body,
                    )
                )
        return result

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)


# -- Chromium -------------------------------------------------------------------------------


@dataclass
class BrowserRun:
    url: str
    dom: str
    seconds: float

    def outcome(self, name: str) -> str:
        match = re.search(rf'<p id="{name}">(\w+)</p>', self.dom)
        assert match, f"no outcome for {name!r} in the DOM of {self.url}:\n{self.dom}"
        assert match.group(1) != "pending", (
            f"{name!r} on {self.url} never settled within {VIRTUAL_TIME_BUDGET_MS} ms of page time"
        )
        return match.group(1)


def run_chromium(binary: str, url: str) -> BrowserRun:
    """Load `url` in a fresh headless profile and return the DOM once the page is idle.

    Chromium runs in its own process group so that a timeout takes its helper
    processes down with it, and a fresh profile so no cache or earlier run leaks in.
    """
    with tempfile.TemporaryDirectory(prefix="keyproxy-chromium-") as profile:
        argv = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            "--dump-dom",
            url,
        ]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            pytest.fail(f"Chromium did not finish {url} in {CHROMIUM_TIMEOUT}s:\n{stderr[-3000:]}")
        finally:
            _kill_group(proc)  # helpers that outlive the browser process
        elapsed = time.monotonic() - started
    assert proc.returncode == 0 and "<html" in stdout, (
        f"Chromium failed on {url} (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}"
    )
    return BrowserRun(url, stdout, elapsed)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(5)


# -- the scenario, run once for all the assertions below -----------------------------------


@dataclass
class Scenario:
    page_a: PageServer
    page_b: PageServer
    runs: dict[str, BrowserRun]
    exchanges: dict[str, Exchange]  # by the page= marker in the script URL
    upstream_records: list[dict[str, Any]]

    def exchange(self, page: str) -> Exchange:
        assert page in self.exchanges, (
            f"Chromium sent no request marked page={page}; it sent {sorted(self.exchanges)}"
        )
        return self.exchanges[page]


@pytest.fixture(scope="module")
def scenario(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    stoppers: list[Callable[[], object]] = []
    try:
        upstream: UpstreamServer = start_upstream(
            header_secrets={"X-Upstream-Key": UPSTREAM_SECRET}
        )
        stoppers.append(upstream.stop)
        page_a, page_b = PageServer("127.0.0.1"), PageServer("127.0.0.2")
        stoppers += [page_a.stop, page_b.stop]

        config = base_config(upstream.url, upstream.inject())
        config["server"]["credential_sources"] = ["header", "query"]
        config["keys"] += [
            {
                "id": "web",
                "hash": digest(WEB_KEY),
                "type": "read",
                "referers": [f"{page_a.origin}/*"],
            },
            {
                "id": "web-shop-path",
                "hash": digest(PATH_KEY),
                "type": "read",
                "referers": [f"{page_a.origin}/shop/*"],
            },
        ]
        kp = start_keyproxy(tmp_path_factory.mktemp("browser"), config)
        stoppers.append(kp.stop)
        tap = WireTap((kp.host, kp.port))
        stoppers.append(tap.stop)

        def script(key: str, page: str) -> str:
            # the key sits between other parameters: keyproxy must cut out just the key
            return f"{tap.url}{RESOURCE}&api_key={key}&page={page}"

        page_a.pages["/shop/page.html"] = page_html(
            {"origin_key": script(WEB_KEY, "a"), "path_key": script(PATH_KEY, "a-path")}
        )
        page_a.pages["/shop/private.html"] = page_html(
            {"origin_key": script(WEB_KEY, "a-no-referrer")},
            meta='<meta name="referrer" content="no-referrer">',
        )
        page_b.pages["/shop/page.html"] = page_html({"origin_key": script(WEB_KEY, "b")})
        urls = {
            # a path and a query that a full-URL Referer would have carried
            "a": f"{page_a.origin}/shop/page.html?session=same-origin-only",
            "a-no-referrer": f"{page_a.origin}/shop/private.html",
            "b": f"{page_b.origin}/shop/page.html",
        }
        with ThreadPoolExecutor(len(urls)) as pool:
            futures = {name: pool.submit(run_chromium, chromium, url) for name, url in urls.items()}
            runs = {name: future.result() for name, future in futures.items()}
        exchanges: dict[str, Exchange] = {}
        for exchange in tap.exchanges():
            assert exchange.page not in exchanges, f"page {exchange.page} requested twice"
            exchanges[exchange.page] = exchange
        yield Scenario(page_a, page_b, runs, exchanges, upstream.records())
    finally:
        for stop in reversed(stoppers):
            stop()


# -- what the browser did, what keyproxy decided, what got through ----------------------------


def test_chromium_sends_only_the_origin_cross_origin(scenario: Scenario) -> None:
    """strict-origin-when-cross-origin: the page's path and query never reach keyproxy."""
    origin_a = scenario.page_a.origin
    assert scenario.exchange("a").headers.get("referer") == f"{origin_a}/"
    assert scenario.exchange("a-path").headers.get("referer") == f"{origin_a}/"
    assert scenario.exchange("b").headers.get("referer") == f"{scenario.page_b.origin}/"
    assert "referer" not in scenario.exchange("a-no-referrer").headers
    # the key travelled in the script URL, as a page without CORS must send it
    for exchange in scenario.exchanges.values():
        assert "api_key=pk_" in exchange.target
        assert exchange.headers.get("sec-fetch-dest") == "script"


def test_allowed_origin_loads_through_an_origin_pattern(scenario: Scenario) -> None:
    """`http://host:port/*` matches the bare `origin/` Chromium sends, so the page works."""
    assert scenario.runs["a"].outcome("origin_key") == "loaded"
    assert scenario.exchange("a").status == 200


def test_other_origin_is_refused_for_its_referer(scenario: Scenario) -> None:
    assert scenario.runs["b"].outcome("origin_key") == "error"
    assert_refused(scenario.exchange("b"))


def test_no_referrer_page_is_refused(scenario: Scenario) -> None:
    """A key with an allowlist refuses a request without Referer, even from the right origin."""
    assert scenario.runs["a-no-referrer"].outcome("origin_key") == "error"
    assert_refused(scenario.exchange("a-no-referrer"))


def test_path_pattern_refuses_real_browsers(scenario: Scenario) -> None:
    """A pattern naming the page's path never matches a cross-origin Chromium request.

    The page really is under /shop/, but Chromium only says `origin/`: a
    `referers` entry must name the origin (`.../*`), not the page.
    """
    assert scenario.runs["a"].outcome("path_key") == "error"
    assert_refused(scenario.exchange("a-path"))


def test_upstream_saw_only_the_allowed_request_and_never_the_key(scenario: Scenario) -> None:
    records = scenario.upstream_records
    assert [r["raw_path"] for r in records] == [f"{RESOURCE}&page=a"], records
    record = records[0]
    assert record["authorized"] and record["status"] == 200
    headers = {name.lower(): value for name, value in record["headers"]}
    assert headers["referer"] == f"{scenario.page_a.origin}/"
    wire = repr(records)
    for key in (WEB_KEY, PATH_KEY):
        assert key not in wire


def assert_refused(exchange: Exchange) -> None:
    error = exchange_error(exchange)
    assert (exchange.status, error) == (403, "REFERER_NOT_ALLOWED"), exchange
    assert exchange.response_headers["content-type"].startswith("application/json")
    assert WEB_KEY.encode() not in exchange.body and PATH_KEY.encode() not in exchange.body


def exchange_error(exchange: Exchange) -> str | None:
    try:
        return json.loads(exchange.body).get("error")
    except ValueError:
        return None
