"""Step 2: where the call comes from — client address and Referer (docs/decision.md)."""

from __future__ import annotations

from keyproxy.policy.allowlists import match_referer
from keyproxy.policy.clientip import client_ip
from keyproxy.request import Deny, RequestContext


def check_key_constraints(ctx: RequestContext) -> Deny | None:
    ip = client_ip(ctx.peer_ip, ctx.headers, ctx.config.server.trusted_proxies)
    if isinstance(ip, Deny):
        return ip
    ctx.client_ip = ip
    key = ctx.key
    assert key is not None
    if key.ips is not None and not key.ips.contains(ip):
        return Deny(403, "IP_NOT_ALLOWED", f"client address {ip} is not allowed for this key")
    if key.referers is not None and not match_referer(key.referers, ctx.headers.get("referer")):
        return Deny(
            403, "REFERER_NOT_ALLOWED", "the Referer is missing or not allowed for this key"
        )
    return None
