"""The `keyproxy` command: serve, demo, check, keygen, explain (SPEC §1)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from keyproxy import __version__

#: More processes than this only contend for the same cores.
MAX_WORKERS = 256


def _cmd_serve(args: argparse.Namespace) -> int:
    from keyproxy.server import run

    workers = args.workers.strip()
    if not workers.isdigit() or not 1 <= int(workers) <= MAX_WORKERS:
        print(
            f"--workers {args.workers!r}: expected a whole number from 1 to {MAX_WORKERS} "
            f"(about one per CPU core; this machine has {os.cpu_count() or 1})",
            file=sys.stderr,
        )
        return 2
    return run(args.config, args.host, args.port, int(workers))


def _cmd_demo(args: argparse.Namespace) -> int:
    from keyproxy.demo import run_demo

    return run_demo(args.port)


def _cmd_demo_backend(args: argparse.Namespace) -> int:
    from keyproxy.demo_backend import run_backend

    secret = os.environ.get("UPSTREAM_SECRET", "")
    if not secret:
        print("demo-backend: set UPSTREAM_SECRET, the one secret it accepts", file=sys.stderr)
        return 2
    return run_backend(args.host, args.port, secret)


def _cmd_check(args: argparse.Namespace) -> int:
    from keyproxy.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc))
        return 1
    except OSError as exc:
        print(f"{args.config}: cannot read: {exc.strerror}")
        return 1
    print(f"OK: {config.summary()}")
    now = time.time()
    for key in config.keys:
        if key.expires_at is not None and key.expires_at <= now and not key.revoked:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(key.expires_at))
            print(
                f"note: {args.config}:{key.line}: key {key.id!r} expired on {when}: "
                "every request with it is refused (TOKEN_EXPIRED); extend `expires` or remove it",
                file=sys.stderr,
            )
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from keyproxy.config.keys_section import KEY_ID_RULE, valid_key_id
    from keyproxy.credentials import generate_key, yaml_entry

    key_id = args.id or ("browser" if args.kind == "publishable" else "service")
    if not valid_key_id(key_id):
        print(f"--id {key_id!r} is not a valid key id: use {KEY_ID_RULE}", file=sys.stderr)
        return 2
    key = generate_key(args.kind)
    print("Your new key (shown once; keyproxy stores only its hash):\n")
    print(f"  {key}\n")
    print("Paste this entry under `keys:` in your configuration:\n")
    print(yaml_entry(key, key_id, args.kind))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from keyproxy.config import ConfigError, load_config
    from keyproxy.explain import explain, render

    if args.key is None and args.jwt is None:
        print("explain needs --key or --jwt", file=sys.stderr)
        return 2
    from keyproxy.clientip import parse_peer

    try:
        parse_peer(args.ip)
    except ValueError:
        print(f"--ip: {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc))
        return 2
    result = asyncio.run(
        explain(
            config,
            args.method,
            args.url,
            key=args.key,
            jwt=args.jwt,
            ip=args.ip,
            referer=args.referer,
        )
    )
    if args.json:
        import json

        from keyproxy.explain import as_json

        print(json.dumps(as_json(result, args.method, args.url, config), indent=2))
    else:
        print(render(result, args.method, args.url, config))
    return 0 if result.allowed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyproxy",
        description="An authorizing reverse proxy: keeps your backend's secret "
        "and hands out scoped keys.",
    )
    parser.add_argument("--version", action="version", version=f"keyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy", description="Run the proxy.")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML configuration")
    p.add_argument("--host", help="listen address (overrides server.listen)")
    p.add_argument("--port", type=int, help="listen port (overrides server.listen)")
    p.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="processes sharing the port (SO_REUSEPORT)",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "demo",
        help="run a sample backend with keyproxy in front of it",
        description="Start a sample REST backend and keyproxy in front of it, print curl lines "
        "to try, and stop both on Ctrl-C.",
    )
    p.add_argument("--port", type=int, help="proxy port (default 8080, or a free one)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "demo-backend",
        help="run only the sample backend (for docker-compose)",
        description="Serve the sample REST backend that `demo` uses, accepting only the "
        "secret in $UPSTREAM_SECRET.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_cmd_demo_backend)

    p = sub.add_parser(
        "check", help="validate a configuration file", description="Validate a configuration file."
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "keygen",
        help="make a new key and its YAML entry",
        description="Print a new key once, and the YAML entry (holding only its hash) to paste.",
    )
    p.add_argument("--kind", choices=["publishable", "secret"], default="publishable")
    p.add_argument("--id", help="the key id for the YAML entry")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "explain",
        help="replay the decision for one request, step by step",
        description="Run the whole decision offline and print every step and the verdict "
        "(exit 0 allow, 1 deny).",
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", help="the API key the request carries")
    who.add_argument("--jwt", help="an end-user token (Authorization: Bearer)")
    p.add_argument("--ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    p.add_argument("--referer", help="the Referer header")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("url", metavar="URL", help="absolute URL or path, e.g. /v1/data/posts")
    p.set_defaults(func=_cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
