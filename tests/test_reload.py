"""When an edited configuration file is read: only once it has stopped changing."""

from __future__ import annotations

import os
from pathlib import Path

from keyproxy.config.reload import ConfigHolder
from tests.test_config import BASE, ENV, parse


def _touch(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_being_written_is_read_only_after_a_quiet_poll(tmp_path: Path) -> None:
    path = tmp_path / "keyproxy.yaml"
    _touch(path, BASE, 1_000_000_000)
    holder = ConfigHolder(parse(BASE, ENV), str(path))
    assert not holder.settled_change()  # nothing changed

    _touch(path, BASE + "keys:\n", 2_000_000_000)  # an edit starts
    assert not holder.settled_change()  # changed: wait, the writer may not be done
    _touch(path, BASE + "keys: []\n", 3_000_000_000)  # and goes on
    assert not holder.settled_change()  # changed again: wait again
    assert holder.settled_change()  # a whole poll without change: read it now


def test_an_unchanged_file_is_never_reread(tmp_path: Path) -> None:
    path = tmp_path / "keyproxy.yaml"
    _touch(path, BASE, 1_000_000_000)
    holder = ConfigHolder(parse(BASE, ENV), str(path))
    assert [holder.settled_change() for _ in range(3)] == [False, False, False]
