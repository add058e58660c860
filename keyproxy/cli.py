"""The `keyproxy` command: serve, demo, check, keygen, explain (SPEC §1)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from keyproxy import __version__


def _cmd_serve(args: argparse.Namespace) -> int:
    from keyproxy.server import run

    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    return run(args.config, args.host, args.port, args.workers)


def _cmd_demo(args: argparse.Namespace) -> int:
    from keyproxy.demo import run_demo

    return run_demo(args.port)


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
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from keyproxy.credentials import generate_key, yaml_entry

    key = generate_key(args.kind)
    key_id = args.id or ("browser" if args.kind == "publishable" else "service")
    print("Your new key (shown once; keyproxy stores only its hash):\n")
    print(f"  {key}\n")
    print("Paste this entry under `keys:` in your configuration:\n")
    print(yaml_entry(key, key_id, args.kind))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from keyproxy.config import ConfigError, load_config
    from keyproxy.explain import explain, render

    if args.key is None and args.key_id is None:
        print("explain needs --key or --key-id", file=sys.stderr)
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
    if args.key_id is not None and not any(k.id == args.key_id for k in config.keys):
        print(f"--key-id: no key with id {args.key_id!r} in {args.config}", file=sys.stderr)
        return 2
    result = asyncio.run(
        explain(
            config,
            args.method,
            args.url,
            key=args.key,
            key_id=args.key_id,
            jwt=args.jwt,
            ip=args.ip,
            referer=args.referer,
        )
    )
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
        type=int,
        default=1,
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
    who.add_argument(
        "--key-id", help="explain for this key without its secret (steps after the key lookup)"
    )
    p.add_argument("--jwt", help="an end-user token (Authorization: Bearer) next to the key")
    p.add_argument("--ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    p.add_argument("--referer", help="the Referer header")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("url", metavar="URL", help="absolute URL or path, e.g. /v1/data/posts")
    p.set_defaults(func=_cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
