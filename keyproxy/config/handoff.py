"""Parse a reload in a child process and hand the result to the event loop in small pieces.

Why a process: parsing a registry of 100,000 keys is seconds of Python work.
On a thread it competes with the event loop for the GIL, and every request in
flight waits for the parser's time slices: measured with `bench/reload.py`, p99
rose about 14-fold and throughput fell by 40% for the ten seconds a reload took.
A child process parses on another core without touching the serving process's
GIL or memory (the YAML tree of a large file is several hundred MB, now freed
with the child, and a child killed for memory leaves the server running).

Why pieces: the result comes back as one pickle stream, written in chunks of
keys with one shared memo, so values many keys share (ACL sets, allowlists,
rates) stay shared. The loop reads one chunk at a time and yields between
chunks, so no single step holds the loop for more than a few milliseconds.
Keys travel as plain tuples: rebuilding a named tuple from a pickle would run
Python code per key; `Key._make` over a list is a fraction of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import io
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

from keyproxy.config.load import ConfigError, config_from_bytes, load_config
from keyproxy.config.model import Config, Key

#: Keys decoded per step on the loop, ~0.3 ms: each step delays the requests of that
#: loop turn. With 1,000 (~1.3 ms) a 100,000-key reload raised p99 1.7-1.9x under
#: load, with 200 1.5-1.6x (`bench/reload.py --keys-file`, 3 rounds each).
CHUNK = 200

#: The last line an in-place edit must end with to be read by the watcher.
END_MARKER = b"# end"

IN_PLACE_WITHOUT_MARKER = (
    "{path} was rewritten in place and does not end with a '# end' line: not applied,"
    " since a half-written file would look the same; write a temporary file and rename"
    " it over {path}, end the file with '# end', or send SIGHUP when the edit is done"
)

Outcome = Config | str | ConfigError


def ends_with_marker(data: bytes) -> bool:
    """Whether the last non-blank line is `# end` (any case, surrounding blanks ignored)."""
    last = data[-4096:].rstrip().rpartition(b"\n")[2]
    return last.strip().lower() == END_MARKER


def load_outcome(path: str, in_place: bool = False) -> Outcome:
    """The file's `Config`, or why it was not applied (a `ConfigError` or one line)."""
    try:
        if not in_place:
            return load_config(path)
        with open(path, "rb") as file:
            data = file.read()
        if not ends_with_marker(data):
            return IN_PLACE_WITHOUT_MARKER.format(path=path)
        return config_from_bytes(data, path)
    except ConfigError as exc:
        return exc
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except Exception as exc:  # a loader bug must cost this edit, never the watcher
        return f"cannot load {path}: internal error ({type(exc).__name__})"


# --------------------------------------------------------------------------- the stream


class _Pickler(pickle.Pickler):
    """Frozen dataclasses go back through their constructor: the default for a slotted
    dataclass, `__setstate__`, looks up its fields again for every object, which for the
    30,000 distinct referer patterns of a large registry was most of the decoding."""

    def reducer_override(self, obj: object) -> Any:
        cls = type(obj)
        fields = _INIT_FIELDS.get(cls)
        if fields is None:
            if (
                not dataclasses.is_dataclass(cls)
                or "__slots__" not in cls.__dict__
                # A mutable one may refer to itself (a fields filter's node does), which
                # a constructor call cannot rebuild: pickle's own way handles cycles.
                or not cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            ):
                return NotImplemented
            declared = dataclasses.fields(cls)
            if not all(f.init for f in declared):
                return NotImplemented
            fields = _INIT_FIELDS[cls] = tuple(f.name for f in declared)
        return cls, tuple([getattr(obj, name) for name in fields])


_INIT_FIELDS: dict[type, tuple[str, ...]] = {}


def code_fingerprint() -> str:
    """Which keyproxy code this process runs: its package files' names, sizes and times.

    The stream rebuilds objects from their fields in order, so a child running other
    code than the server (the package replaced under a running server: an upgrade or
    a rollback in place) could fill the wrong fields, a flag with another's value.
    """
    import keyproxy

    root = os.path.dirname(os.path.abspath(keyproxy.__file__))
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(names):
            if name.endswith((".py", ".so", ".pyd")):
                path = os.path.join(folder, name)
                found = os.stat(path)
                where = os.path.relpath(path, root)
                digest.update(f"{where} {found.st_size} {found.st_mtime_ns}\n".encode())
    return digest.hexdigest()


#: The code this process started with (read at import, before any file could change).
CODE = code_fingerprint()

OTHER_CODE = (
    "not applied: keyproxy's files changed since this server started (an upgrade or a"
    " rollback in place) and the parser ran the new ones: restart keyproxy to apply it"
)


def encode(outcome: Outcome) -> bytes:
    """The outcome as one pickle stream: the code's fingerprint, a head, then the keys
    in chunks, then the index entries of rotated keys' older hashes (copies that say
    which hash)."""
    out = io.BytesIO()
    pickler = _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(CODE)  # a plain string: readable whatever code wrote it
    if not isinstance(outcome, Config):
        pickler.dump(("refused", outcome))
        return out.getvalue()
    keys = outcome.keys
    older = [(digest, tuple(key)) for digest, key in outcome.keys_by_digest.items()
             if digest != key.digest]  # fmt: skip
    shell = dataclasses.replace(outcome, keys=(), keys_by_digest={})
    chunks = range(0, len(keys), CHUNK)
    pickler.dump(("config", shell, len(chunks)))
    for start in chunks:
        pickler.dump([tuple(key) for key in keys[start : start + CHUNK]])
    pickler.dump(older)
    return out.getvalue()


#: What a configuration is made of besides keyproxy's own classes: anything else in the
#: stream is refused, so the stream can only ever build data, never call a function.
_STDLIB = frozenset(
    {
        ("builtins", "frozenset"),
        ("builtins", "set"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "object"),
        ("copyreg", "_reconstructor"),
        ("re", "_compile"),
        ("collections", "OrderedDict"),
        ("ipaddress", "IPv4Address"),
        ("ipaddress", "IPv6Address"),
        ("ipaddress", "IPv4Network"),
        ("ipaddress", "IPv6Network"),
        ("ipaddress", "IPv4Interface"),
        ("ipaddress", "IPv6Interface"),
    }
)


class _Unpickler(pickle.Unpickler):
    """Rebuilds only keyproxy's classes and the few plain types listed in `_STDLIB`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STDLIB:
            return super().find_class(module, name)
        if module == "keyproxy" or module.startswith("keyproxy."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"the configuration stream holds {module}.{name}")


def _pieces(data: bytes) -> Iterator[Any]:
    """Each object of the stream in turn; the memo carries over between them."""
    unpickler = _Unpickler(io.BytesIO(data))
    while True:
        try:
            yield unpickler.load()
        except EOFError:
            return


def decode_steps(data: bytes) -> Iterator[Outcome | None]:
    """Rebuild the outcome one chunk per step (None: not done yet; the last value is it).

    The cyclic collector is paused meanwhile, and what it would have to walk
    afterwards is frozen (`gc.freeze`) once the keys are built: otherwise the
    first collection after the swap walks a hundred thousand fresh objects in one
    go, a pause of its own. Garbage is collected first, so only what the loop
    creates during the few hundred milliseconds of decoding is frozen with them.
    """
    pieces = _pieces(data)
    if next(pieces) != CODE:
        yield OTHER_CODE
        return
    head = next(pieces)
    if head[0] == "refused":
        yield head[1]
        return
    shell: Config = head[1]
    n_chunks: int = head[2]
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        keys: list[Key] = []
        by_digest: dict[bytes, Key] = {}
        make = Key._make
        for _ in range(n_chunks):
            chunk = [make(row) for row in next(pieces)]
            keys.extend(chunk)
            by_digest.update([(key.digest, key) for key in chunk])
            yield None
        for digest, row in next(pieces):
            by_digest[digest] = make(row)
        config = dataclasses.replace(shell, keys=tuple(keys), keys_by_digest=by_digest)
        gc.freeze()
    finally:
        if collecting:
            gc.enable()
    yield config


async def decode(data: bytes) -> Outcome:
    """`decode_steps` on the loop, letting requests run between the steps."""
    outcome: Outcome | None = None
    for step in decode_steps(data):
        outcome = step
        await asyncio.sleep(0)  # after the last step too: the swap is a turn of its own
    assert outcome is not None
    return outcome


#: Replaced keys freed per loop turn, ~0.5 ms: freeing a 100,000-key registry in one
#: go (its tuple dropped with the old snapshot) held the loop for 17-25 ms.
RELEASE = 2000


async def release(keys: list[Key]) -> None:
    """Free a replaced registry's keys a slice per loop turn. `keys` must hold the last
    references: a key still used elsewhere (a request in flight) lives on until then."""
    while keys:
        del keys[-RELEASE:]
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- the child

#: A parse that takes longer (a keys file on a hung mount, a FIFO) is given up, so the
#: next reload can run; 100,000 keys take a few seconds.
CHILD_TIMEOUT = 120.0


async def load_in_child(path: str, in_place: bool = False) -> Outcome:
    """Parse `path` in a fresh Python process (same interpreter, same environment)."""
    import keyproxy

    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(keyproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # As `-P`: the working directory is not put first on sys.path, so a stray `keyproxy/`
    # or `yaml.py` there is never what the child imports.
    env["PYTHONSAFEPATH"] = "1"
    argv = [sys.executable, "-m", "keyproxy.config.handoff", path]
    if in_place:
        argv.append("--in-place")
    try:
        child = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env
        )
    except OSError as exc:
        return f"cannot load {path}: no process to parse it in ({exc.strerror or exc})"
    try:
        async with asyncio.timeout(CHILD_TIMEOUT):
            data, _ = await child.communicate()
    except TimeoutError:
        child.kill()
        await child.wait()
        return f"cannot load {path}: parsing took over {CHILD_TIMEOUT:.0f}s (is the file readable?)"
    except asyncio.CancelledError:
        if child.returncode is None:
            child.kill()
        raise
    if child.returncode != 0 or not data:
        return f"cannot load {path}: the parsing process failed (exit status {child.returncode})"
    try:
        return await decode(data)
    except Exception as exc:  # a stream this process cannot rebuild: the old config stays
        return f"cannot load {path}: the parsed configuration could not be read back ({exc})"


#: The parser's CPU priority (`nice`): below the server's, so it takes the CPU time
#: live traffic leaves rather than sharing it evenly with the server.
CHILD_NICENESS = 10


def main(argv: list[str]) -> int:
    """`python -m keyproxy.config.handoff PATH [--in-place]`: the stream on stdout."""
    path, in_place = argv[0], "--in-place" in argv[1:]
    with contextlib.suppress(OSError):  # not permitted here: parse at the server's priority
        os.nice(CHILD_NICENESS)
    sys.stdout.buffer.write(encode(load_outcome(path, in_place)))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
