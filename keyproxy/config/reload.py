"""Hot reload: watch the file (and SIGHUP), swap one immutable snapshot, keep the last good one.

An edit is applied whole or not at all: a file that fails to load leaves the
running configuration in force, and the failure is logged and counted. The
file is polled rather than watched with inotify so that editors that replace
the file, bind mounts and ConfigMap symlink swaps all behave the same.

A half-written file must never be taken for a whole one: a key list cut before
a key's `revoked: true` or `ips:` line is valid YAML that grants more than the
finished file. No quiet period tells a pausing writer from a finished one, so
the watcher trusts only what cannot be partial:

* a file *replaced* (a new inode: write a temporary file, then rename it over
  the old one; editors that save by rename, `kubectl` ConfigMap swaps) is
  complete by construction, and is read once it has stopped changing;
* a file *rewritten in place* (same inode) is read only when its last line is
  the end marker `# end`, which a writer reaching the end of the file writes
  last; without it the edit is refused and logged, and the running
  configuration stays in force. A file deleted and created again at its path
  is written in place too, though it is a new inode: inotify tells it from a
  rename (`arrivals`);
* SIGHUP is the operator saying the edit is done: it reads the file as it is.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

from keyproxy.config.arrivals import Arrivals
from keyproxy.config.handoff import (
    END_MARKER,
    IN_PLACE_WITHOUT_MARKER,
    Outcome,
    ends_with_marker,
    load_in_child,
    release,
)
from keyproxy.config.load import ConfigError, load_config
from keyproxy.config.model import Config
from keyproxy.observability import log_event

__all__ = ["END_MARKER", "IN_PLACE_WITHOUT_MARKER", "ConfigHolder", "ends_with_marker"]

POLL_INTERVAL = 0.5  # seconds; an edit takes effect within about a second (README, Operations)


def _fingerprint(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigHolder:
    def __init__(self, config: Config, path: str | None = None) -> None:
        self._config = config
        self.path = path
        self._subscribers: list[Callable[[Config], None]] = []
        self._seen = _fingerprint(path) if path else None
        #: The fingerprint of the file whose configuration is in force.
        self.applied = self._seen
        self._keys_seen = self._keys_fingerprint()  # the `keys_file`, watched with the file
        # A change not yet settled: (the file's fingerprint, the keys file's).
        self._changing: tuple[object, object] | None = None
        self.reloads = {"success": 0, "error": 0}
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self._missing = False  # the file was found gone (logged once until it is back)
        #: How the file arrived at its path, once `watch` runs (None: not known here).
        self._arrivals: Arrivals | None = None
        self._hup_waiting = False  # a SIGHUP's reload is queued and has not begun

    @classmethod
    def load(cls, path: str) -> ConfigHolder:
        return cls(load_config(path), path)

    @property
    def config(self) -> Config:
        return self._config

    def subscribe(self, callback: Callable[[Config], None]) -> None:
        self._subscribers.append(callback)

    def _keys_fingerprint(self) -> tuple[int, int, int] | None:
        keys_file = self._config.keys_file
        return _fingerprint(keys_file) if keys_file else None

    async def reload(self, *, in_place: bool = False) -> bool:
        """Parse the file in a child process, then swap on the loop.

        A large registry takes seconds to parse; parsing on the loop, or on a thread
        that shares the loop's GIL, would stall every request in flight for that
        long (see `handoff`). `in_place`: the watcher saw the file rewritten in
        place, so it is read only if it ends with the marker.
        """
        if self.path is None:
            return False
        if self._arrivals is not None:
            self._arrivals.forget()  # before the fingerprint: a create after it counts
        reading = _fingerprint(self.path)
        self._seen, self._keys_seen = reading, self._keys_fingerprint()
        async with self._lock:  # one reload at a time; the last edit wins
            outcome = await load_in_child(self.path, in_place)
            # The replaced registry's keys outlive the swap in this list alone (listing
            # 100,000 keys takes ~4 ms: a loop turn apart from the swap's ~9).
            retired = list(self._config.keys) if isinstance(outcome, Config) else []
            await asyncio.sleep(0)
            applied = self._apply(outcome, reading)
        await release(retired)
        return applied

    def _apply(self, outcome: Outcome, fingerprint: tuple[int, int, int] | None) -> bool:
        if not isinstance(outcome, Config):
            self.reloads["error"] += 1
            if isinstance(outcome, ConfigError):
                self.last_error = str(outcome)
                # `check`'s own lines (file:line: where: message (hint)), never a repr.
                errors = [issue.format(outcome.source) for issue in outcome.issues]
            else:
                self.last_error = outcome
                errors = [outcome]
            log_event("config_reload", result="error", errors=errors)
            return False
        old, config = self._config, outcome
        self._config = config
        self.applied = fingerprint
        self.reloads["success"] += 1
        self.last_error = None
        for callback in self._subscribers:
            callback(config)
        if (config.server.listen, config.server.admin_listen) != (
            old.server.listen,
            old.server.admin_listen,
        ):
            log_event("config_reload_note", message="listen addresses change only on restart")
        log_event("config_reload", result="success", config=config.summary())
        return True

    def reload_soon(self) -> None:
        """For SIGHUP. A signal while an earlier one still waits for its turn adds
        nothing: that one reads the file as it is when its turn comes. A storm of
        SIGHUPs queued a parsing process each, seconds of CPU apiece for a large registry.
        """
        if self._hup_waiting:
            return
        self._hup_waiting = True
        asyncio.get_running_loop().create_task(self._reload_on_hup())

    async def _reload_on_hup(self) -> None:
        async with self._lock:  # a reload in progress read the file before this signal
            self._hup_waiting = False
        await self.reload()

    def in_place(self) -> bool:
        """Whether the file now on disk was changed, and is the same inode as the one last read
        or a file created at the path (not moved there) since.

        A `keys_file` needs no marker: each key is one line, and a line cut short is
        not valid JSON, so a half-written keys file can only lack whole keys, never
        hold one with less than its finished line says.
        """
        assert self.path is not None
        now = _fingerprint(self.path)
        if now is None or now == self._seen:
            return False
        if self._seen is not None and now[2] == self._seen[2]:
            return True
        return self._arrivals is not None and self._arrivals.created_in_place()

    def settled_change(self) -> bool:
        """One poll: whether the file (or its `keys_file`) changed and then stayed the same
        for a whole poll.

        A file rewritten in place (not replaced by a rename) is read too early
        otherwise: a half-written key list can be valid YAML that grants more than
        the finished one (a key before its `ips:` or `revoked: true` line arrives).
        """
        assert self.path is not None
        seen = _fingerprint(self.path)
        if seen is None and not self._missing:
            self._missing = True
            log_event(
                "config_missing",
                path=self.path,
                message="the configuration file is gone; serving the last loaded "
                "configuration until it is back",
            )
        elif seen is not None and self._missing:
            self._missing = False
            log_event("config_back", path=self.path)
        keys = self._keys_fingerprint()
        if seen is None or (seen, keys) == (self._seen, self._keys_seen):
            self._changing = None
            return False
        if (seen, keys) != self._changing:
            self._changing = (seen, keys)  # still being written, perhaps: look again next poll
            return False
        self._changing = None
        return True

    def watch_arrivals(self) -> None:
        """Tell a file created at the path from one moved there (see `arrivals`)."""
        assert self.path is not None
        self._arrivals = Arrivals.start(self.path)
        if self._arrivals is None:
            log_event(
                "config_watch",
                message="inotify is not available: a file deleted and written again at "
                f"{self.path} is read as soon as it stops changing; replace it by rename",
            )
        elif not self._arrivals.watching:
            log_event(
                "config_watch",
                message=f"cannot watch the directory of {self.path} (inotify watch limit?): "
                "every new file there needs a '# end' line or SIGHUP, renamed or not",
            )

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        if self.path is None:
            return
        self.watch_arrivals()
        while True:
            await asyncio.sleep(interval)
            if self.settled_change():
                await self.reload(in_place=self.in_place())


# --------------------------------------------------------------------------- workers

#: In the supervisor's shared directory (next to the workers' `<pid>.json` metrics
#: snapshots): the fingerprint of the file the workers serve.
APPLIED_FILE = "config.applied"


def record_applied(directory: str, fingerprint: tuple[int, int, int] | None) -> None:
    """Note, for a worker restarted later, which version of the file is in force."""
    if fingerprint is None:
        return
    target = os.path.join(directory, APPLIED_FILE)
    temporary = f"{target}.{os.getpid()}"
    try:
        with open(temporary, "w") as file:
            file.write(json.dumps(list(fingerprint)))
        os.replace(temporary, target)
    except OSError as exc:
        log_event("config_applied_unrecorded", error=exc.strerror)


def unapplied_edit(directory: str, path: str) -> str | None:
    """Why a restarted worker must not load `path` yet, or None.

    The running workers refuse an in-place edit without the end marker (it may be
    half written), but a worker starting afresh reads whatever is on disk: it
    would serve the very file the others refused. So a restarted worker takes a file
    other than the one in force only when it ends with the marker; otherwise it
    exits, and the supervisor retries it until the edit is finished or applied.
    """
    try:
        with open(os.path.join(directory, APPLIED_FILE)) as file:
            applied = tuple(json.load(file))
    except (OSError, ValueError):
        return None  # the first start: nothing is in force yet
    if _fingerprint(path) == applied:
        return None
    try:
        with open(path, "rb") as file:
            if ends_with_marker(file.read()):
                return None
    except OSError:
        return None  # the load reports it
    return (
        f"{path} changed since the running workers loaded it and is not yet applied by "
        "them (no '# end' line): this worker waits for the edit to be finished"
    )
