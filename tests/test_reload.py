"""When an edited configuration file is read: only once it has stopped changing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyproxy.config.arrivals import Arrivals
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


# --------------------------------------------------------------------------- partial files


def test_the_end_marker_is_the_last_non_blank_line() -> None:
    from keyproxy.config.reload import ends_with_marker

    assert ends_with_marker(b"keys: []\n# end\n")
    assert ends_with_marker(b"keys: []\n  # END  \n\n")
    assert ends_with_marker(b"# end")
    assert not ends_with_marker(b"keys: []\n")
    assert not ends_with_marker(b"# end\nkeys: []\n")
    assert not ends_with_marker(b"keys: []\n# end of keys\n")
    assert not ends_with_marker(b"")


def _holder_after_edit(tmp_path: Path, write, monkeypatch) -> tuple[ConfigHolder, bool]:
    import asyncio

    path = tmp_path / "keyproxy.yaml"
    path.write_text(BASE)
    holder = ConfigHolder(parse(BASE, ENV), str(path))
    write(path)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return holder, asyncio.run(holder.reload(in_place=holder.in_place()))


def test_an_in_place_edit_without_the_marker_is_refused(tmp_path: Path, monkeypatch) -> None:
    edited = BASE.replace("3000", "3001")

    def in_place(path: Path) -> None:
        with open(path, "w") as file:  # same inode
            file.write(edited)

    holder, applied = _holder_after_edit(tmp_path, in_place, monkeypatch)
    assert not applied and holder.config.upstream.port == 3000
    assert "rewritten in place" in (holder.last_error or "")
    assert holder.reloads["error"] == 1


def test_an_in_place_edit_ending_with_the_marker_is_read(tmp_path: Path, monkeypatch) -> None:
    def in_place(path: Path) -> None:
        with open(path, "w") as file:
            file.write(BASE.replace("3000", "3001") + "# end\n")

    holder, applied = _holder_after_edit(tmp_path, in_place, monkeypatch)
    assert applied and holder.config.upstream.port == 3001


def test_a_file_replaced_by_rename_needs_no_marker(tmp_path: Path, monkeypatch) -> None:
    def by_rename(path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(BASE.replace("3000", "3001"))
        tmp.replace(path)

    holder, applied = _holder_after_edit(tmp_path, by_rename, monkeypatch)
    assert applied and holder.config.upstream.port == 3001


@pytest.mark.parametrize("deleted_first", [False, True], ids=["in place", "deleted first"])
def test_a_half_written_file_never_goes_live(tmp_path: Path, upstream, deleted_first) -> None:
    """A real `keyproxy serve`; the file is rewritten in place (or removed, then written at
    its path: a new inode is no proof of a rename) in two parts with a pause of several
    polls between them. The key whose `revoked: true` comes last stays revoked."""
    import time

    import yaml

    from tests.proxy_process import KEYS, base_config, digest, start_keyproxy
    from tests.test_lifecycle import wait_until

    victim = "pk_" + "9" * 64
    newcomer = "pk_" + "8" * 64
    config = base_config(upstream.url, upstream.inject())
    config["keys"].append({"id": "victim", "hash": digest(victim), "type": "read", "revoked": True})
    kp = start_keyproxy(tmp_path, config)
    try:
        assert kp.request("GET", "/echo/x", key=victim)[0] == 401
        edited = dict(config)
        edited["keys"] = [
            {"id": "newcomer", "hash": digest(newcomer), "type": "read"},
            *config["keys"],
        ]
        text = yaml.safe_dump(edited, sort_keys=False) + "# end\n"
        cut = text.rindex("  revoked: true")
        assert text[cut:].count("\n") == 2  # the victim's revocation is the last setting
        old_inode = kp.config_path.stat().st_ino
        if deleted_first:
            # A backup link keeps the old inode, so the new file cannot reuse its number.
            os.link(kp.config_path, kp.config_path.with_suffix(".bak"))
            kp.config_path.unlink()
        with open(kp.config_path, "w") as file:  # truncated in place, or a new file
            file.write(text[:cut])
            file.flush()
            assert (kp.config_path.stat().st_ino != old_inode) is deleted_first
            time.sleep(2.0)  # four polls: the half file is quiet long enough to be read
            assert kp.request("GET", "/echo/x", key=victim)[0] == 401
            assert kp.request("GET", "/echo/x", key=newcomer)[0] == 401  # not applied
            file.write(text[cut:])
        # Two quiet polls and a parsing process: seconds on a loaded machine.
        assert wait_until(lambda: kp.request("GET", "/echo/x", key=newcomer)[0] == 200, 15.0)
        assert kp.request("GET", "/echo/x", key=victim)[0] == 401
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 200
        assert "rewritten in place" in kp.process.stderr
    finally:
        kp.stop()


def test_a_storm_of_sighups_reads_the_file_once_or_twice(tmp_path: Path, monkeypatch) -> None:
    """Each read is a parsing process; signals that arrive while one waits add nothing,
    and one that arrives while a read is under way gets a read of its own afterwards."""
    import asyncio

    path = tmp_path / "keyproxy.yaml"
    path.write_text(BASE)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    holder = ConfigHolder(parse(BASE, ENV), str(path))

    async def storm() -> None:
        for _ in range(20):
            holder.reload_soon()
        while sum(holder.reloads.values()) < 1:  # a failed read ends the wait too
            await asyncio.sleep(0.01)
        busy = asyncio.create_task(holder.reload())  # a read under way
        await asyncio.sleep(0)
        for _ in range(20):
            holder.reload_soon()
        await busy
        deadline = asyncio.get_running_loop().time() + 60  # bounded: never hangs the run
        while len(asyncio.all_tasks()) > 1:  # every queued read has run
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)

    asyncio.run(storm())
    assert holder.reloads == {"success": 3, "error": 0}


# --------------------------------------------------------------------------- arrivals


def test_arrivals_tell_a_file_created_at_the_path_from_one_moved_there(tmp_path: Path) -> None:
    path = tmp_path / "keyproxy.yaml"
    path.write_text("a")
    arrivals = Arrivals.start(str(path))
    assert arrivals is not None  # Linux: inotify is there
    try:
        assert not arrivals.created_in_place()
        path.unlink()
        path.write_text("b")  # deleted, then written again at its path
        assert arrivals.created_in_place()
        assert arrivals.created_in_place()  # until the file is read
        arrivals.forget()
        assert not arrivals.created_in_place()
        path.unlink()
        path.write_text("c")
        tmp = tmp_path / "next.tmp"
        tmp.write_text("d")
        tmp.replace(path)  # the last arrival is a rename: whole
        assert not arrivals.created_in_place()
        (tmp_path / "other.yaml").write_text("e")  # another name in the directory
        assert not arrivals.created_in_place()
        path.unlink()
        path.symlink_to(tmp_path / "other.yaml")  # a link made at the path names a whole file
        assert not arrivals.created_in_place()
    finally:
        arrivals.close()


def test_a_file_deleted_and_written_again_needs_the_marker(tmp_path: Path, monkeypatch) -> None:
    import asyncio

    path = tmp_path / "keyproxy.yaml"
    path.write_text(BASE)
    holder = ConfigHolder(parse(BASE, ENV), str(path))
    holder.watch_arrivals()
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    os.link(path, tmp_path / "backup.yaml")  # keeps the inode: the new file gets another
    path.unlink()
    path.write_text(BASE.replace("3000", "3001"))  # a new inode, yet written in place
    assert holder.in_place()
    assert not asyncio.run(holder.reload(in_place=holder.in_place()))
    assert holder.config.upstream.port == 3000 and "in place" in (holder.last_error or "")
    path.unlink()
    path.write_text(BASE.replace("3000", "3002") + "# end\n")
    assert asyncio.run(holder.reload(in_place=holder.in_place()))
    assert holder.config.upstream.port == 3002


def test_a_directory_that_cannot_be_watched_fails_closed_and_says_so(
    tmp_path: Path, capsys
) -> None:
    """No watch on the directory (here: it is missing; in life, the watch limit): any file
    that arrives could have been written in place, so each needs `# end` or SIGHUP."""
    path = tmp_path / "missing" / "keyproxy.yaml"
    arrivals = Arrivals.start(str(path))
    assert arrivals is not None and not arrivals.watching
    try:
        assert arrivals.created_in_place()
    finally:
        arrivals.close()
    holder = ConfigHolder(parse(BASE, ENV), str(path))
    holder.watch_arrivals()
    assert "cannot watch the directory" in capsys.readouterr().err
