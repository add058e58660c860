"""The `keyproxy` command: serve, demo, check, keygen, explain, replay (README, Commands)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from urllib.parse import urlsplit

from keyproxy import __version__

#: More processes than this only contend for the same cores.
MAX_WORKERS = 256


def _fds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _bad_port(args: argparse.Namespace) -> bool:
    """A `--port` no socket can have, said in one line (not the OverflowError of bind)."""
    if args.port is None or 0 <= args.port <= 65535:
        return False
    print(f"--port {args.port}: expected a port from 0 to 65535 (0: any free one)", file=sys.stderr)
    return True


def _cmd_serve(args: argparse.Namespace) -> int:
    from keyproxy.lifecycle import WorkerLink, run

    if _bad_port(args):
        return 2
    workers = args.workers.strip()
    if not workers.isdigit() or not 1 <= int(workers) <= MAX_WORKERS:
        print(
            f"--workers {args.workers!r}: expected a whole number from 1 to {MAX_WORKERS} "
            f"(about one per CPU core; this machine has {os.cpu_count() or 1})",
            file=sys.stderr,
        )
        return 2
    link = None
    if args.listen_fds is not None:  # started by a `--workers` supervisor
        link = WorkerLink(
            _fds(args.listen_fds), _fds(args.admin_fds or ""), args.ready_fd, args.supervisor_pid
        )
    return run(args.config, args.host, args.port, int(workers), link)


def _cmd_demo(args: argparse.Namespace) -> int:
    from keyproxy.commands.demo import run_demo

    if _bad_port(args):
        return 2
    return run_demo(args.port)


def _cmd_demo_backend(args: argparse.Namespace) -> int:
    from keyproxy.commands.demo_backend import run_backend

    if _bad_port(args):
        return 2
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
                f"note: {key.file or args.config}:{key.line}: key {key.id!r} expired on {when}: "
                "every request with it is refused (TOKEN_EXPIRED); extend `expires` or remove it",
                file=sys.stderr,
            )
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from keyproxy.config.keys_section import KEY_ID_RULE, valid_key_id
    from keyproxy.policy.credentials import generate_key, yaml_entry

    if args.rotate is not None:
        return _rotate(args)
    if args.config is not None or args.grace is not None:
        print("keygen: -c and --grace go with --rotate ID", file=sys.stderr)
        return 2
    if args.id is not None and not valid_key_id(args.id):
        print(
            f"keygen: --id {args.id!r} is not a valid key id: use {KEY_ID_RULE}",
            file=sys.stderr,
        )
        return 2
    args.kind = args.kind or "publishable"
    key_id = args.id or ("browser" if args.kind == "publishable" else "service")
    key = generate_key(args.kind)
    print("Your new key (shown once; keyproxy stores only its hash):\n")
    print(f"  {key}\n")
    print("Paste this entry under `keys:` in your configuration:\n")
    print(yaml_entry(key, key_id, args.kind))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """`keygen --rotate ID -c FILE`: a new key for an existing id, old ones kept for a grace."""
    import time

    from keyproxy.config import ConfigError, load_config
    from keyproxy.config.model import KeyType
    from keyproxy.config.units import UnitError, parse_duration
    from keyproxy.policy.credentials import (
        generate_key,
        json_hashes,
        rotation_block,
        utc_text,
    )

    if args.config is None or args.id is not None:
        print("keygen --rotate ID needs -c FILE (and no --id)", file=sys.stderr)
        return 2
    try:
        grace = parse_duration(args.grace or "7d")
    except UnitError as exc:
        print(f"keygen: --grace: {exc}", file=sys.stderr)
        return 2
    if grace <= 0:
        print("keygen: --grace must be longer than 0s", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc))
        return 1
    current = next((k for k in config.keys if k.id == args.rotate), None)
    if current is None:
        print(f"keygen: {args.config} has no key with id {args.rotate!r}", file=sys.stderr)
        return 1
    found = sorted(
        (
            (
                k.rotation.index if k.rotation else 0,
                digest,
                k.rotation.until if k.rotation else None,
            )
            for digest, k in config.keys_by_digest.items()
            if k.id == args.rotate
        ),
    )
    kind = args.kind or ("publishable" if current.type is KeyType.READ else "secret")
    key = generate_key(kind)
    now = time.time()
    block, ends = rotation_block(key, [(digest, until) for _, digest, until in found], now, grace)
    print(f"The new key for {args.rotate!r} (shown once; keyproxy stores only its hash):\n")
    print(f"  {key}\n")
    if current.file is not None:  # a `keys_file` line: the same hashes, as its JSON field
        print(
            f"In {current.file}, line {current.line}, replace the key's hash with this "
            '"hashes" field:\n'
        )
        print(json_hashes(block))
    else:
        print(
            f"In {args.config}, replace the hash of key {args.rotate!r} "
            f"(line {current.line}) with these lines:\n"
        )
        print(block)
    print(
        f"Until {utc_text(ends)} the old key works too; after that it is refused with "
        'TOKEN_EXPIRED ("this key was rotated"). Hand out the new key before then.'
    )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from keyproxy.commands.explain import explain, render
    from keyproxy.config import ConfigError, load_config

    if args.key is None and args.key_id is None and args.origin is None:
        print("explain needs --key or --key-id (or --origin for a CORS preflight)", file=sys.stderr)
        return 2
    from keyproxy.policy.clientip import parse_peer

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
    if args.via is not None and args.key is None:
        print("--via says how --key travels: give --key too", file=sys.stderr)
        return 2
    problem = _explain_input_problem(args.url, args.header)
    if problem is not None:
        print(problem, file=sys.stderr)
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
            origin=args.origin,
            extra_headers=tuple(_header_pair(h) for h in args.header),
            via=args.via,
        )
    )
    if args.json:
        import json

        from keyproxy.commands.explain import as_json

        print(json.dumps(as_json(result, args.method, args.url, config), indent=2))
    else:
        print(render(result, args.method, args.url, config))
    return 0 if result.allowed or result.reply is not None else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    from keyproxy.commands.replay import run

    return run(args.config, args.log, args.json)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _explain_input_problem(url: str, headers: list[str]) -> str | None:
    """What is wrong with explain's request, as one line; None when it can be decided.

    A header or URL that no HTTP client could send is the user's typo, and deciding
    something else in its place (a nameless header, the path `/`) would print a
    verdict for a request nobody asked about: bad input, exit 2.
    """
    for text in headers:
        name, colon, _ = text.partition(":")
        if not colon or _HEADER_NAME.fullmatch(name.strip()) is None:
            return f"--header: {text!r} is not a header: write it as 'Name: value'"
    scheme, sep, _ = url.partition("://")
    if not sep:
        return None
    if scheme.lower() not in ("http", "https"):
        return f"URL: {url!r} is not http:// or https://: give such a URL, or a path like /v1/data"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # a port out of range or not a number raises here
    except ValueError as exc:
        return f"URL: {url!r} is not a valid URL ({exc}): give one, or a path like /v1/data/posts"
    if not parts.hostname:
        return f"URL: {url!r} names no host: give one, or a path like /v1/data/posts"
    return None


def _header_pair(text: str) -> tuple[str, str]:
    name, _, value = text.partition(":")
    return name.strip(), value.strip()


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
        help="worker processes accepting on the one listening socket",
    )
    # How a supervisor hands a worker its sockets; not for people.
    p.add_argument("--listen-fds", help=argparse.SUPPRESS)
    p.add_argument("--admin-fds", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
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
    p.add_argument(
        "--kind",
        choices=["publishable", "secret"],
        help="pk_ or sk_ (default: publishable; with --rotate, as the key's type suggests)",
    )
    p.add_argument("--id", help="the key id for the YAML entry")
    p.add_argument(
        "--rotate",
        metavar="ID",
        help="a new key for the existing key ID; prints the hashes: lines to paste",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="the configuration (with --rotate)")
    p.add_argument(
        "--grace",
        metavar="DURATION",
        help="with --rotate: how long the old key keeps working (default 7d)",
    )
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "explain",
        help="replay the decision for one request, step by step",
        description="Run the whole decision offline and print every step and the verdict "
        "(exit 0 allow, 1 deny, 2 bad input).",
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", help="the API key the request carries")
    who.add_argument(
        "--key-id", help="explain for this key without its secret (steps after the key lookup)"
    )
    p.add_argument(
        "--via",
        choices=("header", "basic", "query"),
        help="how --key travels: X-API-Key header, Basic credentials (with the key's id) or "
        "the query parameter (default: the first source server.credential_sources enables)",
    )
    p.add_argument("--jwt", help="an end-user token (Authorization: Bearer) next to the key")
    p.add_argument("--ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    p.add_argument("--referer", help="the Referer header")
    p.add_argument("--origin", help="the Origin header (a browser's cross-origin call)")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="another request header, e.g. 'Access-Control-Request-Method: GET' (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("url", metavar="URL", help="absolute URL or path, e.g. /v1/data/posts")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "replay",
        help="re-decide a recorded access log under a candidate configuration",
        description="Re-decide every request of a keyproxy access log under FILE and report "
        "the requests whose verdict would change, grouped by key, route and reason "
        "(exit 0 nothing changes, 1 something does, 2 unreadable input).",
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="the candidate YAML")
    p.add_argument(
        "--log", required=True, metavar="ACCESS_LOG", help="a keyproxy JSON access log (-: stdin)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (for CI)")
    p.set_defaults(func=_cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
