"""A socket in memory, for driving keyproxy's protocols without a kernel.

Shared by the socket-free exchange tests and `bench/datapath.py`.
"""

from __future__ import annotations

import asyncio


class MemoryTransport(asyncio.Transport):
    """Counts (and, with `keep`, collects) what is written; reports a loopback peer.
    `bench/datapath.py` passes `keep=False`: a million answers need not stay in memory."""

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.data = bytearray()
        self.written = 0
        self.closing = False
        self.eof = False  # the sending side was shut (a lingering close)

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += len(data)
        if self.keep:
            self.data += data

    def writelines(self, parts) -> None:  # type: ignore[no-untyped-def, override]
        for part in parts:
            self.write(part)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
