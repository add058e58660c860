"""Structured log lines on stderr: one JSON object per event.

Values are ids, addresses and counts chosen by the caller; never a key, a
token or an upstream secret.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log_event(event: str, **fields: Any) -> None:
    record = {"time": round(time.time(), 3), "event": event}
    record.update((k, v) for k, v in fields.items() if v is not None)
    sys.stderr.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
    sys.stderr.flush()
