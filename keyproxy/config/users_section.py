"""The `users` section: how end users' tokens (JWT) are verified."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from yaml.nodes import Node

from keyproxy.config.yaml_reader import Reader, did_you_mean
from keyproxy.policy.users import (
    ALGORITHMS,
    HMAC_ALGORITHMS,
    HMAC_MIN_BYTES,
    PUBLIC_KEY_ALGORITHMS,
    JwtSettings,
    TokenVerifier,
)

_USERS_FIELDS = frozenset({"jwt"})
_JWT_FIELDS = frozenset(
    {
        "algorithms",
        "secret",
        "public_key_file",
        "jwks_url",
        "issuer",
        "audience",
        "user_claim",
        "roles_claim",
        "leeway",
        "jwks_refresh",
        "jwks_min_refresh",
        "cache_size",
    }
)
_KEY_SOURCES = ("secret", "public_key_file", "jwks_url")
_LOOPBACK_NAMES = frozenset({"localhost"})


def _loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _algorithms(r: Reader, node: Node, where: str) -> tuple[str, ...] | None:
    items = r.texts(node, where, non_empty="name the algorithms your identity provider signs with")
    if items is None:
        return None
    ok = True
    for position, (item, name) in enumerate(items):
        if name not in ALGORITHMS:
            ok = False
            hint = did_you_mean(name, ALGORITHMS) or "accepted: " + ", ".join(ALGORITHMS)
            message = (
                "'none' is never accepted: it means an unsigned token"
                if name.lower() == "none"
                else f"{name!r} is not an accepted algorithm"
            )
            r.issue(item, f"{where}[{position}]", message, hint)
    return tuple(name for _, name in items) if ok else None


def _public_key(r: Reader, node: Node, where: str, base_dir: str, algorithms: tuple[str, ...]):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = r.text(node, where)
    if text is None:
        return None, None
    path = os.path.abspath(os.path.join(base_dir, text))
    hint = "give a PEM file holding the identity provider's public key (BEGIN PUBLIC KEY)"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        r.issue(node, where, f"cannot read {path}: {error.strerror or error}", hint)
        return None, None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        r.issue(node, where, f"{path} is not a PEM public key", hint)
        return None, None
    wanted = {"RS": rsa.RSAPublicKey, "PS": rsa.RSAPublicKey, "ES": ec.EllipticCurvePublicKey}
    wrong = [a for a in algorithms if a[:2] in wanted and not isinstance(key, wanted[a[:2]])]
    if wrong:
        r.issue(
            node,
            where,
            f"the key in {path} cannot verify {', '.join(wrong)}",
            "RS*/PS* need an RSA key, ES* an EC key",
        )
        return None, None
    return key, path


def _jwks_url(r: Reader, node: Node, where: str) -> str | None:
    url = r.text(node, where)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        parts, host = None, ""
    hint = "like https://auth.example.com/.well-known/jwks.json (http:// only on loopback)"
    if parts is None or not host or parts.username or parts.fragment:
        r.issue(node, where, "not a valid JWKS URL", hint)
        return None
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(host)):
        return url
    r.issue(node, where, "a JWKS URL must be https:// (http:// only on a loopback address)", hint)
    return None


def read_users(r: Reader, node: Node | None, base_dir: str = "") -> TokenVerifier | None:
    if node is None:
        return None
    fields = r.fields(node, "users", _USERS_FIELDS)
    if fields is None:
        return None
    if "jwt" not in fields:
        r.issue(node, "users", "'jwt' is required", "add users: {jwt: {algorithms: [...], ...}}")
        return None
    where = "users.jwt"
    jwt_node = fields["jwt"]
    f = r.fields(jwt_node, where, _JWT_FIELDS)
    if f is None:
        return None
    before = len(r.issues)
    values: dict[str, object] = {}
    algorithms: tuple[str, ...] | None = None
    if "algorithms" not in f:
        r.issue(jwt_node, where, "'algorithms' is required", "like algorithms: [RS256]")
    else:
        algorithms = _algorithms(r, f["algorithms"], f"{where}.algorithms")
    sources = [name for name in _KEY_SOURCES if name in f]
    if len(sources) != 1:
        r.issue(
            jwt_node,
            where,
            "exactly one of secret, public_key_file or jwks_url is required"
            + (f" (found {', '.join(sources)})" if sources else ""),
            "secret for HS256/384/512; public_key_file or jwks_url for RS/PS/ES",
        )
    elif algorithms is not None:
        source = sources[0]
        hmac_algs = [a for a in algorithms if a in HMAC_ALGORITHMS]
        public_algs = [a for a in algorithms if a in PUBLIC_KEY_ALGORITHMS]
        if source == "secret" and public_algs:
            r.issue(
                f["algorithms"],
                f"{where}.algorithms",
                f"{', '.join(public_algs)} need a public key, not a shared secret",
                "use public_key_file or jwks_url for them, or list only HS256/384/512",
            )
        elif source != "secret" and hmac_algs:
            r.issue(
                f["algorithms"],
                f"{where}.algorithms",
                f"{', '.join(hmac_algs)} would use the public key as an HMAC secret",
                "remove them: HMAC tokens need secret: instead",
            )
        elif source == "secret":
            secret = r.text(f["secret"], f"{where}.secret")
            need = max(HMAC_MIN_BYTES[a] for a in hmac_algs)
            if secret is not None and len(secret.encode()) < need:
                r.issue(
                    f["secret"],
                    f"{where}.secret",
                    f"the secret is shorter than {need} bytes",
                    "use a random value at least as long as the hash, like `openssl rand -hex 32`",
                )
            values["secret"] = secret
        elif source == "public_key_file":
            key, path = _public_key(r, f[source], f"{where}.{source}", base_dir, algorithms)
            values["public_key"], values["public_key_file"] = key, path
        else:
            values["jwks_url"] = _jwks_url(r, f[source], f"{where}.jwks_url")
    if ("jwks_refresh" in f or "jwks_min_refresh" in f) and "jwks_url" not in f:
        name = "jwks_refresh" if "jwks_refresh" in f else "jwks_min_refresh"
        r.issue(f[name], f"{where}.{name}", "only applies with jwks_url", "remove it")
    for name, example in (("issuer", "https://login.example.com/"), ("audience", "my-api")):
        # A token another application asked for must not log in here: both are
        # checked unless the file says, explicitly, that any value will do.
        if name not in f:
            r.issue(
                jwt_node,
                where,
                f"'{name}' is required: without it a token issued for another application"
                " would be accepted",
                f"like {name}: {example} (or {name}: any to accept every {name})",
            )
    for name in ("issuer", "audience", "user_claim", "roles_claim"):
        if name in f:
            value = r.text(f[name], f"{where}.{name}")
            if value == "":
                r.issue(f[name], f"{where}.{name}", "is empty", "write a value, or remove it")
            values[name] = None if name in ("issuer", "audience") and value == "any" else value
    if "leeway" in f:
        values["leeway"] = r.duration(f["leeway"], f"{where}.leeway", allow_zero=True, maximum=300)
    if "jwks_refresh" in f:
        values["jwks_refresh"] = r.duration(f["jwks_refresh"], f"{where}.jwks_refresh")
    if "jwks_min_refresh" in f:
        values["jwks_min_refresh"] = r.duration(
            f["jwks_min_refresh"], f"{where}.jwks_min_refresh", allow_zero=True
        )
    if "cache_size" in f:
        values["cache_size"] = r.integer(f["cache_size"], f"{where}.cache_size", 1, 10_000_000)
    if len(r.issues) != before or algorithms is None:
        return None
    settings = JwtSettings(algorithms=algorithms, **values)  # type: ignore[arg-type]  # the reader built each value with the type of its field
    jwks = None
    if settings.jwks_url is not None:
        from keyproxy.jwks import jwks_cache

        jwks = jwks_cache(settings.jwks_url)
    return TokenVerifier(settings, jwks)
