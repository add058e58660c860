"""Forwarding: the upstream request built from the decision (`plan`)."""

from keyproxy.forward.plan import ForwardPlan, identity_block, valid_host

__all__ = ["ForwardPlan", "identity_block", "valid_host"]
