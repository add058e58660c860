"""Referer patterns and IP allowlists (STUB: being implemented)."""

from __future__ import annotations
