"""How the configuration file last arrived at its path: moved there, or created there.

The watcher reads a file that replaced the one it last read (a new inode) without
waiting for an end marker, because a rename puts a finished file in place at once.
A file deleted and then written again at its path is a new inode too, yet it is
written in place: read half way (a key before its `revoked: true` line), it grants
more than the finished file. Polling cannot tell the two apart, and neither can
the file's times; the kernel can: inotify reports a rename into the directory as
`IN_MOVED_TO` and a new file as `IN_CREATE`.

A symbolic link made at the path is taken as moved: it names its target whole
(`ln -sfn`, and a ConfigMap's `..data` swap, which happens a level below the
path). Where inotify is not available (not Linux, no instance left), `start`
returns None, the watcher says so once, and every new inode is taken for a
replacement, as before. Where the directory cannot be watched (the watch limit
reached), every arrival counts as a create: a rename then needs `# end` or
SIGHUP too, and the watcher says so.
"""

from __future__ import annotations

import os

try:
    from inotify_simple import INotify, flags
except ImportError:  # not Linux
    INotify = None


class Arrivals:
    """The directory of one path, watched for files created or moved in under its name."""

    def __init__(self, path: str, inotify: INotify) -> None:
        self.path = path
        self.directory, self.name = os.path.split(os.path.abspath(path))
        self._inotify = inotify
        self._watch: int | None = None
        #: The path's last arrival was a create, not a move (or events were lost).
        self._created = False
        self._add_watch()

    @classmethod
    def start(cls, path: str) -> Arrivals | None:
        """An `Arrivals` for `path`, or None where the kernel cannot watch its directory."""
        if INotify is None:
            return None
        try:
            return cls(path, INotify(nonblocking=True))
        except OSError:
            return None

    @property
    def watching(self) -> bool:
        """Whether the directory is watched (else every arrival counts as a create)."""
        return self._watch is not None

    def _add_watch(self) -> None:
        try:
            self._watch = self._inotify.add_watch(
                self.directory, flags.CREATE | flags.MOVED_TO | flags.ONLYDIR
            )
        except OSError:
            self._watch = None
            self._created = True  # unwatched: an arrival now could be either

    def _drain(self) -> None:
        if self._watch is None:
            self._add_watch()  # the directory was gone or replaced
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                self._created = True  # events were lost: fail closed
            elif event.wd == self._watch and event.mask & flags.IGNORED:
                self._watch = None
                self._created = True
            elif event.wd == self._watch and event.name == self.name:
                self._created = bool(event.mask & flags.CREATE)

    def created_in_place(self) -> bool:
        """Whether a file at the path was created there (and not moved there) since `forget`."""
        self._drain()
        return self._created and not os.path.islink(self.path)

    def forget(self) -> None:
        """The file now at the path is about to be read: earlier arrivals no longer count."""
        self._drain()
        self._created = False

    def close(self) -> None:
        self._inotify.close()
