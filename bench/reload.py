"""What traffic sees while a 100,000-key registry reloads: p99 with and without a reload.

A reload must not stall the requests in flight. This starts a real upstream
(`bench/upstream.py`) and `keyproxy serve` with the benchmark's policy and a
large key registry, then runs `wrk --latency` for a fixed time twice per round:
once untouched, and once with the configuration replaced by a rename a little
after the start (a regenerated registry: every key but the benchmarked one
changes). Both runs poll nothing and send the same requests, so the difference
in p99 is what the reload costs the requests in flight.

With `--keys-file` the keys live in a JSON-lines file next to a small YAML file
(`keys_file:`), and the reload replaces that file alone.

`--in-process` measures the cause rather than the effect: no wrk, no sockets; the
server's objects (`ProxyServer`, `ConfigHolder`) on a uvloop loop, a task that
does nothing but yield, and `ConfigHolder.reload()` run `--rounds` times (a real
child process parses the new registry). It prints the longest gaps between the
task's turns: the longest time a request would have waited for the loop.

Usage: python bench/reload.py [--keys 100000] [--duration 10] [--rounds 2]
       [--connections 32] [--keys-file] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from policy import SECRET_ENV, SMALL_PATH, build_policy  # noqa: E402

#: What wrk prints at the end, in a form that needs no screen-scraping.
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_keys(config_text: str, keys_file: str) -> tuple[str, bytes]:
    """The YAML without its `keys:` list (naming `keys_file` instead), and the keys as
    JSON lines with the same fields. BaseLoader keeps every value as the text written,
    which is what the key reader reads from either file."""
    head, sep, tail = config_text.partition("\nkeys:\n")
    assert sep, "the policy has a keys section"
    keys = yaml.load("keys:\n" + tail, Loader=yaml.CBaseLoader)["keys"]
    lines = b"".join(orjson.dumps(key) + b"\n" for key in keys)
    return f"{head}\nkeys_file: {keys_file}\n", lines


class Server:
    """One child process, its output in a file (a pipe left unread would block it)."""

    def __init__(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, stdout: bool = True
    ) -> None:
        self.log = log
        self.file = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.file if stdout else subprocess.DEVNULL,
            stderr=self.file,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while re.search(pattern, self.text()) is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.proc.args[:4]} exited:\n{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {pattern!r}:\n{self.text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


def wrk_argv(
    port: int, key: str, referer: str, seconds: int, connections: int, script: Path
) -> list[str]:
    return [
        "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
        "--timeout", "10s", "-s", str(script),
        "-H", f"X-API-Key: {key}", "-H", f"Referer: {referer}",
        f"http://127.0.0.1:{port}{SMALL_PATH}",
    ]  # fmt: skip


class start_wrk:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self) -> dict:
        out, err = self.proc.communicate()
        match = re.search(rb"^BENCH_JSON (\{.*\})$", out, re.MULTILINE)
        if self.proc.returncode != 0 or match is None:
            raise SystemExit(f"wrk failed: {err.decode() or out.decode()}")
        stats = json.loads(match.group(1))
        stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
        return stats


def replace_file(path: Path, data: bytes) -> None:
    """Write a temporary file next to `path`, then rename it over: the way to edit."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def loop_pauses(n_keys: int, rounds: int) -> int:
    """`--in-process`: the loop's longest pauses during real reloads (full policy)."""
    import asyncio

    import uvloop
    from policy import Features

    from keyproxy.app import ProxyServer, freeze_long_lived
    from keyproxy.config.reload import ConfigHolder

    tmp = Path(tempfile.mkdtemp(prefix="keyproxy-reload-"))
    os.environ.setdefault(SECRET_ENV, "bench-upstream-secret-0123456789")
    config = tmp / "config.yaml"

    def write(seed: int) -> None:
        features = Features.full(str(tmp / "access.log"))
        policy = build_policy(
            "http://127.0.0.1:9", "127.0.0.1:8", "127.0.0.1:7", n_keys=n_keys, seed=seed,
            features=features,
        )  # fmt: skip
        text, lines = split_keys(policy.yaml, "keys.jsonl")
        replace_file(tmp / "keys.jsonl", lines)
        replace_file(config, text.encode())

    async def turns(gaps: list[float], done: asyncio.Event) -> None:
        """Yield, and note how long each turn of the loop took to come back."""
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def measure(holder: ConfigHolder) -> None:
        for round_ in range(rounds):
            write(2 + round_)
            gaps: list[float] = []
            done = asyncio.Event()
            ticker = asyncio.create_task(turns(gaps, done))
            started = time.perf_counter()
            applied = await holder.reload()
            took = time.perf_counter() - started
            done.set()
            await ticker
            longest = ", ".join(f"{g * 1000:.1f}" for g in sorted(gaps, reverse=True)[:5])
            print(
                f"round {round_ + 1}: reload {'applied' if applied else 'REFUSED'} in {took:.2f} s,"
                f" {len(gaps)} loop turns; longest pauses (ms): {longest}"
            )

    try:
        write(1)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        holder = ConfigHolder.load(str(config))
        ProxyServer(holder, loop)  # subscribes: the swap rebuilds its plan as `serve`'s does
        freeze_long_lived()
        print(f"{n_keys} keys (keys_file), full policy, in-process reloads:")
        loop.run_until_complete(measure(holder))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (without, with)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--reload-at", type=float, default=1.5, help="seconds into the run")
    p.add_argument("--keys-file", action="store_true", help="keys in a JSON-lines file")
    p.add_argument(
        "--in-process", action="store_true", help="the loop's longest pauses, no load (keys_file)"
    )
    args = p.parse_args(argv)
    if args.in_process:
        return loop_pauses(args.keys, args.rounds)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="keyproxy-reload-"))
    servers: list[Server] = []
    try:
        script = tmp / "report.lua"
        script.write_text(WRK_LUA)
        body = tmp / "small.json"
        body.write_bytes(b'{"id": 42, "title": "hello", "body": "' + b"x" * 200 + b'"}')
        up_port, port, admin = free_port(), free_port(), free_port()
        upstream = Server(
            [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(up_port),
             "--route", f"{SMALL_PATH}={body}"],
            tmp / "upstream.log",
        )  # fmt: skip
        servers.append(upstream)
        upstream.wait_for("listening", 10)

        config = tmp / "config.yaml"
        keys_path = tmp / "keys.jsonl"

        def render(seed: int, bench_key: str | None = None) -> tuple[str, str, dict[Path, bytes]]:
            """The benchmark key, its referer, and the files to write (seed: the other keys)."""
            policy = build_policy(
                f"http://127.0.0.1:{up_port}", f"127.0.0.1:{port}", f"127.0.0.1:{admin}",
                n_keys=args.keys, seed=seed, bench_key=bench_key,
            )  # fmt: skip
            if not args.keys_file:
                return policy.key, policy.referer, {config: policy.yaml.encode()}
            text, lines = split_keys(policy.yaml, keys_path.name)
            # A reload replaces the key file alone: the YAML stays as it is.
            files = (
                {keys_path: lines} if config.exists() else {config: text.encode(), keys_path: lines}
            )
            return policy.key, policy.referer, files

        key, referer, files = render(1)
        for path, data in files.items():
            replace_file(path, data)
        secret = {SECRET_ENV: "bench-upstream-secret-0123456789"}
        started = time.monotonic()
        proxy = Server(
            [sys.executable, "-m", "keyproxy", "serve", "-c", str(config)],
            tmp / "keyproxy.log",
            secret,
            stdout=False,  # the access log: only the events on stderr are read
        )
        servers.append(proxy)
        proxy.wait_for('"listening"', 120)
        print(
            f"keyproxy serve: {args.keys} keys ({'keys_file' if args.keys_file else 'YAML'}),"
            f" ready in {time.monotonic() - started:.1f} s; wrk -t1 -c{args.connections} "
            f"-d{args.duration}s, reload at {args.reload_at} s"
        )

        def wrk(seconds: int) -> start_wrk:
            return start_wrk(wrk_argv(port, key, referer, seconds, args.connections, script))

        wrk(2).result()  # warm-up
        results: dict[str, list[dict]] = {"without": [], "with": []}
        for round_ in range(args.rounds):
            _, _, files = render(100 + round_, key)  # before the runs: it costs CPU
            results["without"].append(wrk(args.duration).result())
            before = proxy.text().count('"result":"success"')
            run = wrk(args.duration)
            time.sleep(args.reload_at)
            for path, data in files.items():
                replace_file(path, data)
            changed = time.monotonic()
            applied = None
            while run.proc.poll() is None:
                if applied is None and proxy.text().count('"result":"success"') > before:
                    applied = time.monotonic() - changed
                time.sleep(0.05)
            stats = run.result()
            if applied is None:
                raise SystemExit(
                    "the reload was not applied within the run (make --duration longer):\n"
                    + proxy.text()[-3000:]
                )
            stats["applied_s"] = applied
            results["with"].append(stats)
            for name in ("without", "with"):
                s = results[name][-1]
                extra = (
                    f", reload applied {s['applied_s']:.1f} s after the rename"
                    if name == "with"
                    else ""
                )
                print(
                    f"round {round_ + 1} {name:>7} reload: {s['rps']:.0f} req/s, "
                    f"p50 {s['p50_us'] / 1000:.2f} ms, p99 {s['p99_us'] / 1000:.2f} ms, "
                    f"max {s['max_us'] / 1000:.1f} ms, errors {s['errors']}, "
                    f"non-2xx {s['non_2xx']}{extra}"
                )
        best = {name: min(s["p99_us"] for s in runs) / 1000 for name, runs in results.items()}
        print(
            f"p99 without a reload {best['without']:.2f} ms, with a reload {best['with']:.2f} ms "
            f"(best of {args.rounds}): {best['with'] / best['without']:.2f}×"
        )
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
