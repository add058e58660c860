"""keyproxy: an authorizing reverse proxy that keeps one backend secret, hands out scoped keys."""

__version__ = "0.1.0"
