"""keyproxy: an authorizing reverse proxy that holds your backend's secret and hands out scoped keys."""

__version__ = "0.1.0"
