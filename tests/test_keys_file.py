"""`keys_file:` (keys as JSON lines) and reloads parsed in a child process.

The keys file is read by the YAML key reader itself, so the same mistakes get
the same messages; what these tests add is where the messages point (the keys
file and its line), what JSON alone would let through (a repeated field), and
that a running `keyproxy serve` reloads when only the keys file changes and
keeps its last good configuration when the keys file is bad.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from keyproxy.config import ConfigError, handoff, load_config
from keyproxy.config.model import Config, KeyType
from keyproxy.config.reload import ConfigHolder
from tests.test_config import BASE, ENV, hash_of

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, lines: list[str | dict], yaml_keys: str = "") -> Path:
    (tmp_path / "keys.jsonl").write_text(
        "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    )
    path = tmp_path / "keyproxy.yaml"
    path.write_text(BASE + yaml_keys + "keys_file: keys.jsonl\n")
    return path


def _load(path: Path):
    return load_config(path, ENV)


def _issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(path)
    return str(caught.value).splitlines()


def test_keys_from_the_file_are_the_keys_yaml_would_give(tmp_path: Path) -> None:
    fields = {
        "id": "web",
        "hash": hash_of(1),
        "type": "read",
        "acls": ["get", "search"],
        "referers": ["https://*.example.com/*"],
        "ips": ["10.0.0.0/8"],
        "rate_limit": ["10/second", "1000/hour"],
        "quota": "100000/month",
        "expires": "2027-01-01T00:00:00Z",
        "scopes": ["posts:read"],
        "fields": {"exclude": ["email"]},
    }
    path = _write(
        tmp_path, [fields, {"id": "w", "hash": hash_of(2), "type": "write", "revoked": True}]
    )
    from_file = _load(path)
    yaml_text = (
        "keys:\n  - "
        + json.dumps(fields)
        + "\n  - "
        + json.dumps({"id": "w", "hash": hash_of(2), "type": "write", "revoked": True})
        + "\n"
    )
    (tmp_path / "plain.yaml").write_text(BASE + yaml_text)
    from_yaml = load_config(tmp_path / "plain.yaml", ENV)
    strip = [key._replace(line=0, file=None) for key in from_file.keys]
    assert strip == [key._replace(line=0) for key in from_yaml.keys]
    assert [(k.file, k.line) for k in from_file.keys] == [(str(tmp_path / "keys.jsonl"), 1)] * 1 + [
        (str(tmp_path / "keys.jsonl"), 2)
    ]
    assert from_file.keys_file == str(tmp_path / "keys.jsonl")
    assert from_file.keys[1].revoked and from_file.keys[1].type is KeyType.WRITE
    assert set(from_file.keys_by_digest) == {key.digest for key in from_file.keys}


def test_yaml_keys_and_file_keys_together_and_their_lines(tmp_path: Path) -> None:
    yaml_keys = f'keys:\n  - {{id: hand, hash: "{hash_of(0)}", type: read}}\n'
    path = _write(tmp_path, ["", {"id": "gen", "hash": hash_of(1), "type": "read"}], yaml_keys)
    config = _load(path)
    assert [(k.id, k.line, k.file) for k in config.keys] == [
        ("hand", 10, None),
        ("gen", 2, str(tmp_path / "keys.jsonl")),  # a blank line is skipped, still counted
    ]


def test_errors_name_the_keys_file_and_its_line_with_the_yaml_hint(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {"id": "a", "hash": hash_of(1), "type": "reed"},
            {"id": "b", "hash": hash_of(2), "type": "read", "acl": ["get"]},
            '{"id": "c", "hash": ',
            "[1, 2]",
            {"id": "d", "hash": hash_of(1), "type": "read", "quota": 1.5},
        ],
    )
    keys = str(tmp_path / "keys.jsonl")
    issues = _issues(path)
    assert issues[0] == (
        f"{keys}:1: keys[0].type: expected read, write or admin, found 'reed' "
        "(hint: did you mean 'read'?)"
    )
    assert issues[1].startswith(
        f"{keys}:2: keys[1].acl: unknown field 'acl' (hint: did you mean 'acls'?"
    )
    assert issues[2].startswith(f"{keys}:3: keys[2]: invalid JSON at column")
    assert "one whole JSON object" in issues[2]
    assert issues[3].startswith(f"{keys}:4: keys[3]: expected one JSON object on this line")
    assert (
        f"{keys}:5: keys[4].hash: the same hash is already used by keys[0] ({keys}:1)" in issues[4]
    )
    assert f"{keys}:5: keys[4].quota: expected a whole number" in "\n".join(issues)


def test_ids_and_hashes_are_unique_across_both_files(tmp_path: Path) -> None:
    yaml_keys = f'keys:\n  - {{id: same, hash: "{hash_of(0)}", type: read}}\n'
    path = _write(tmp_path, [{"id": "same", "hash": hash_of(1), "type": "read"}], yaml_keys)
    (issue,) = _issues(path)
    keys = tmp_path / "keys.jsonl"
    assert issue.startswith(
        f"{keys}:1: keys[1].id: key id 'same' is already used by keys[0] (line 10)"
    )


@pytest.mark.parametrize(
    "line",
    [
        '{"id": "k", "hash": "%s", "type": "read", "revoked": true, "revoked": false}',
        '{"id": "k", "hash": "%s", "type": "read", "revoked" : true, "revoked":false}',
        '{"id": "k", "hash": "%s", "type": "read", "description": "a\\"b", "type": "admin"}',
    ],
)
def test_a_repeated_field_is_refused_as_in_yaml(tmp_path: Path, line: str) -> None:
    path = _write(tmp_path, [line % hash_of(1)])
    (issue,) = _issues(path)
    assert "appears twice in this object" in issue and issue.startswith(
        f"{tmp_path / 'keys.jsonl'}:1: keys[0]."
    )


def test_strings_that_look_like_field_names_are_not_repeats(tmp_path: Path) -> None:
    line = '{"id": "k", "hash": "%s", "type": "read", "description": ":type\\": \\"x"}'
    path = _write(tmp_path, [line % hash_of(1)])
    assert [k.id for k in _load(path).keys] == ["k"]


def test_values_are_read_as_yaml_reads_them(tmp_path: Path) -> None:
    """JSON types do not bypass the reader: `null`, a number id, a quoted boolean."""
    path = _write(
        tmp_path,
        [
            {"id": None, "hash": hash_of(1), "type": "read"},
            {"id": "b", "hash": hash_of(2), "type": "read", "revoked": "yes"},
            {"id": "c", "hash": hash_of(3), "type": "read", "acls": "get"},
        ],
    )
    text = "\n".join(_issues(path))
    assert "keys[0].id: has no value" in text
    assert "keys[1].revoked: expected true or false, found 'yes'" in text
    assert "keys[2].acls: expected a list" in text


def test_a_missing_keys_file_names_the_setting_and_the_path(tmp_path: Path) -> None:
    path = tmp_path / "keyproxy.yaml"
    path.write_text(BASE + "keys_file: nowhere.jsonl\n")
    (issue,) = _issues(path)
    assert issue.startswith(f"{path}:9: keys_file: cannot read {tmp_path / 'nowhere.jsonl'}")
    assert "JSON-lines" in issue


def test_check_reads_the_keys_file(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "read"}])
    env = {**os.environ, **ENV}
    ok = subprocess.run(
        [sys.executable, "-m", "keyproxy", "check", "-c", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0 and "1 key" in ok.stdout, ok
    (tmp_path / "keys.jsonl").write_text('{"id": "a", "hash": "sha256:00", "type": "read"}\n')
    bad = subprocess.run(
        [sys.executable, "-m", "keyproxy", "check", "-c", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1
    assert f"{tmp_path / 'keys.jsonl'}:1: keys[0].hash: expected sha256:" in bad.stdout + bad.stderr


# --------------------------------------------------------------------------- the handoff


def test_the_handoff_rebuilds_the_same_config_in_pieces(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(handoff, "CHUNK", 2)
    rotated = {
        "id": "rot",
        "hashes": [hash_of(10), {"hash": hash_of(11), "until": "2030-01-01"}],
        "type": "read",
    }
    lines = [{"id": f"k{i}", "hash": hash_of(i), "type": "read", "ips": ["10.0.0.0/8"]}
             for i in range(5)]  # fmt: skip
    path = _write(tmp_path, [*lines, rotated])
    config = _load(path)
    steps = list(handoff.decode_steps(handoff.encode(config)))
    assert steps[:-1] == [None] * 3  # three chunks of two keys, the loop runs between them
    decoded = steps[-1]
    assert decoded == config and decoded.keys == config.keys
    assert dict(decoded.keys_by_digest) == dict(config.keys_by_digest)
    old = bytes.fromhex(hash_of(11)[7:])
    assert decoded.keys_by_digest[old].rotation.position == 1
    # Values the keys shared are still shared, not one copy per key.
    assert len({id(key.ips) for key in decoded.keys if key.ips}) == 1


def test_whether_any_key_filters_fields_is_known_after_the_handoff(tmp_path: Path) -> None:
    """The swap reads it instead of walking every key; wrong as False, answers a key
    must see filtered would go out whole."""
    plain = {"id": "a", "hash": hash_of(1), "type": "read"}
    filtered = {"id": "b", "hash": hash_of(2), "type": "read", "fields": {"exclude": ["pin"]}}
    for lines, expected in (([plain], False), ([plain, filtered], True)):
        config = _load(_write(tmp_path, lines))
        assert config.any_key_fields is expected
        decoded = list(handoff.decode_steps(handoff.encode(config)))[-1]
        assert decoded.any_key_fields is expected


def test_a_stream_from_other_code_is_refused_before_anything_is_rebuilt(
    tmp_path: Path, monkeypatch
) -> None:
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "read"}])
    monkeypatch.setattr(handoff, "CODE", "written by another version")
    stream = handoff.encode(_load(path))
    monkeypatch.undo()
    assert list(handoff.decode_steps(stream)) == [handoff.OTHER_CODE]
    assert isinstance(list(handoff.decode_steps(handoff.encode(_load(path))))[-1], Config)


def test_the_handoff_carries_a_refusal(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "reed"}])
    (outcome,) = handoff.decode_steps(handoff.encode(handoff.load_outcome(str(path))))
    assert isinstance(outcome, ConfigError) and "'reed'" in str(outcome)


def test_a_reload_parses_in_a_child_process(tmp_path: Path, monkeypatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "read"}])
    holder = ConfigHolder(_load(path), str(path))
    children: list[list[str]] = []
    spawn = asyncio.create_subprocess_exec

    async def recording(*argv, **kwargs):
        children.append([str(a) for a in argv])
        return await spawn(*argv, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording)
    (tmp_path / "keys.jsonl").write_bytes(
        orjson.dumps({"id": "b", "hash": hash_of(2), "type": "read"}) + b"\n"
    )
    assert asyncio.run(holder.reload())
    assert [k.id for k in holder.config.keys] == ["b"]
    assert children and children[0][1:4] == ["-m", "keyproxy.config.handoff", str(path)]


def test_a_replaced_registry_is_freed_a_slice_per_loop_turn() -> None:
    """Freeing 100,000 keys at once held the loop ~20 ms: requests run between slices."""
    total = handoff.RELEASE * 3 + 1
    keys = [object() for _ in range(total)]
    seen: list[int] = []

    async def main() -> None:
        async def request() -> None:
            for _ in range(10):
                seen.append(len(keys))
                await asyncio.sleep(0)

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        await handoff.release(keys)  # type: ignore[arg-type]
        await running

    asyncio.run(main())
    assert keys == []
    assert seen[:5] == [total, total - handoff.RELEASE, total - 2 * handoff.RELEASE, 1, 0]


def test_serve_lets_every_replaced_registry_go(tmp_path: Path, monkeypatch) -> None:
    """`serve` kept the startup snapshot in a local for its whole life: after the first
    reload a 100,000-key registry stayed in memory twice. The parse runs in-process here
    (what is tested is who holds the old keys), and each reload frees through `release`."""
    import signal

    from keyproxy import lifecycle
    from keyproxy.config import reload as reload_module
    from keyproxy.config.model import HostPort
    from keyproxy.wire.listeners import bind

    def config_with(first: int) -> Config:
        lines = [
            {"id": f"k{i}", "hash": hash_of(i), "type": "read"} for i in range(first, first + 50)
        ]
        return _load(_write(tmp_path, lines))

    startup, second, third = config_with(0), config_with(100), config_with(200)
    # The digest objects of each registry: alone in the world once their keys are freed.
    watched = [startup.keys[0].digest, second.keys[0].digest]
    queue = [second, third]
    released: list[int] = []

    async def parse_here(path: str, in_place: bool = False) -> Config:
        return queue.pop(0)

    async def counting_release(keys: list) -> None:
        released.append(len(keys))
        await handoff.release(keys)

    monkeypatch.setattr(reload_module, "load_in_child", parse_here)
    monkeypatch.setattr(reload_module, "release", counting_release)
    holder = ConfigHolder(startup, str(tmp_path / "keyproxy.yaml"))
    del startup, second, third

    async def main() -> list[int]:
        ready = asyncio.get_running_loop().create_future()
        loopback = HostPort("127.0.0.1", 0)
        serving = asyncio.create_task(
            lifecycle.serve(
                holder, ready=ready, sockets=bind(loopback, "port", "-"),
                admin_sockets=bind(loopback, "admin port", "-"),
            )
        )  # fmt: skip
        await ready
        counts = []
        for i in range(len(watched)):
            assert await holder.reload()
            gc.collect()
            counts.append(sys.getrefcount(watched[i]))
        os.kill(os.getpid(), signal.SIGTERM)
        await serving
        return counts

    assert asyncio.run(main()) == [2, 2]  # the list's and getrefcount's own: nobody else's
    assert released == [50, 50]


def test_the_parsing_child_runs_below_the_servers_priority(tmp_path: Path) -> None:
    """The parse is background work: at equal priority it took an even share of a busy
    CPU from the server, and the requests in flight waited (`bench/reload.py`)."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # the child blocks reading it until it is written: time to look
    child = subprocess.Popen(
        [sys.executable, "-m", "keyproxy.config.handoff", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        writer = None
        deadline = time.monotonic() + 30
        while writer is None and time.monotonic() < deadline and child.poll() is None:
            try:  # succeeds once the child has opened the file, so is parsing
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
        assert writer is not None, "the child never opened the file"
        ours, its = os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, child.pid)
        assert its > ours or ours == 19  # 19: the lowest there is
        os.write(writer, b"upstream: {url: http://127.0.0.1:1}\n")
        os.close(writer)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    (outcome,) = handoff.decode_steps(out)
    assert isinstance(outcome, ConfigError)  # a real parse ran once the file arrived


def test_a_change_to_the_keys_file_alone_is_a_change(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "read"}])
    holder = ConfigHolder(_load(path), str(path))
    assert not holder.settled_change()
    keys = tmp_path / "keys.jsonl"
    tmp = tmp_path / "keys.tmp"
    tmp.write_text(json.dumps({"id": "b", "hash": hash_of(2), "type": "read"}) + "\n")
    tmp.replace(keys)
    assert not holder.settled_change()  # changed: wait a poll
    assert holder.settled_change()
    assert not holder.in_place()  # the YAML itself is untouched: no end marker needed


# --------------------------------------------------------------------------- keyproxy serve


def test_serve_reloads_when_only_the_keys_file_changes_and_keeps_the_last_good(
    tmp_path: Path, upstream
) -> None:
    from tests.proxy_process import KEYS, base_config, digest, start_keyproxy
    from tests.test_lifecycle import wait_until

    newcomer = "pk_" + "8" * 64
    keys = tmp_path / "keys.jsonl"

    def write_keys(lines: list[dict | str]) -> None:
        tmp = tmp_path / "keys.jsonl.tmp"
        tmp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        tmp.replace(keys)

    write_keys([{"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"}])
    config = base_config(upstream.url, upstream.inject())
    config["keys"] = []
    config["keys_file"] = str(keys)
    kp = start_keyproxy(tmp_path, config)
    try:
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 200
        assert kp.request("GET", "/echo/x", key=newcomer)[0] == 401
        write_keys([{"id": "newcomer", "hash": digest(newcomer), "type": "read"}])
        assert wait_until(lambda: kp.request("GET", "/echo/x", key=newcomer)[0] == 200, 10.0)
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 401  # gone from the file
        # A bad keys file: refused whole, the last good configuration stays in force.
        write_keys([{"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"}, "{oops"])
        assert wait_until(lambda: "invalid JSON" in kp.process.stderr, 10.0)
        assert f"{keys}:2: keys[1]: invalid JSON" in kp.process.stderr
        assert kp.request("GET", "/echo/x", key=newcomer)[0] == 200
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 401
    finally:
        kp.stop()


def test_serve_refuses_a_reload_parsed_by_other_code_than_its_own(tmp_path: Path, upstream) -> None:
    """Objects cross from the parser by their fields in order: after keyproxy's files were
    replaced under a running server, a parser running the new files could fill the old
    server's fields wrongly (a new field before `cors` turned the safe default of a flag
    into `None`). The server refuses such a stream and keeps its configuration."""
    import shutil

    import keyproxy
    from tests.proxy_process import KEYS, base_config, digest, start_keyproxy
    from tests.test_lifecycle import wait_until

    installed = tmp_path / "site"
    package = Path(keyproxy.__file__).parent
    shutil.copytree(package, installed / "keyproxy", ignore=shutil.ignore_patterns("__pycache__"))
    for shared in package.parent.glob("*__mypyc*"):  # the compiled build's shared library
        shutil.copy2(shared, installed)
    newcomer = "pk_" + "7" * 64
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config, cwd=installed)
    try:
        assert kp.request("GET", "/echo/x", key=newcomer)[0] == 401
        with open(installed / "keyproxy" / "config" / "model.py", "a") as model:
            model.write("\n# an upgrade in place\n")
        changed = json.loads(json.dumps(config))
        changed["keys"].append({"id": "newcomer", "hash": digest(newcomer), "type": "read"})
        kp.rewrite_config(changed)
        assert wait_until(lambda: "restart keyproxy to apply it" in kp.process.stderr, 10.0)
        assert kp.request("GET", "/echo/x", key=newcomer)[0] == 401
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()


def test_keygen_rotate_prints_the_keys_file_field_that_loads(tmp_path: Path) -> None:
    """A key from the keys file is rotated in the keys file: the printed line number is
    that file's, and the printed `"hashes"` field, put in place of `"hash"`, loads."""
    path = _write(
        tmp_path,
        [
            {"id": "other", "hash": hash_of(2), "type": "read"},
            {"id": "web", "hash": hash_of(1), "type": "read"},
        ],
    )
    result = subprocess.run(
        [sys.executable, "-m", "keyproxy", "keygen", "--rotate", "web", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"In {tmp_path / 'keys.jsonl'}, line 2," in result.stdout
    field = next(line for line in result.stdout.splitlines() if line.startswith('"hashes": '))
    hashes = json.loads("{" + field + "}")["hashes"]
    assert hashes[1] == {"hash": hash_of(1), "until": hashes[1]["until"]}
    lines = (tmp_path / "keys.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"id": "web", "hashes": hashes, "type": "read"})
    (tmp_path / "keys.jsonl").write_text("\n".join(lines) + "\n")
    loaded = _load(path)
    by_id = sorted(key.id for key in loaded.keys_by_digest.values())
    assert by_id == ["other", "web", "web"]  # the new hash and the old one in its grace


def _both(tmp_path: Path, lines: list[dict]):
    """The same keys as a keys file and as YAML flow mappings (JSON is YAML): both loads."""
    file_path = _write(tmp_path, lines)
    yaml_path = tmp_path / "plain.yaml"
    yaml_path.write_text(BASE + "keys:\n" + "".join(f"  - {json.dumps(k)}\n" for k in lines))
    results = []
    for path in (file_path, yaml_path):
        try:
            results.append(_load(path).keys)
        except ConfigError as error:
            results.append([(i.line, i.where, i.message, i.hint) for i in error.issues])
    return results


_SHARED = [
    {"type": "read", "acls": ["get", "search"], "rate_limit": "10/second"},
    {"type": "read", "acls": ["search", "get"], "referers": ["https://*.example.com/*"]},
    {"type": "write", "acls": ["index"], "ips": ["10.0.0.0/8", "::1"], "quota": 5000},
    {"type": "write", "quota": "100/month", "rate_limit": ["10/second", "1000/hour"]},
    {"type": "admin", "revoked": True, "mode": "report", "description": "ops"},
    {"type": "read", "expires": "2027-01-01T00:00:00Z", "scopes": ["posts:read"]},
    {"type": "read", "created": "2026-01-01T00:00:00Z", "ttl": "30d", "roles": ["user"]},
    {
        "type": "write",
        "acls": ["index", "delete"],
        "revoked": False,
        "fields": {"exclude": ["email"]},
    },
]


def test_keys_that_share_values_are_the_keys_yaml_would_give(tmp_path: Path) -> None:
    """Values read once and reused for later keys give each key exactly its own fields."""
    lines = [
        {"id": f"k{n}", "hash": hash_of(n), **_SHARED[(n * 5) % len(_SHARED)]} for n in range(40)
    ]
    from_file, from_yaml = _both(tmp_path, lines)
    assert len(from_file) == 40
    assert [k._replace(line=0, file=None) for k in from_file] == [
        k._replace(line=0) for k in from_yaml
    ]
    assert [k.line for k in from_file] == list(range(1, 41))


@pytest.mark.parametrize(
    "bad",
    [
        {"revoked": 1},  # `true` was accepted before: 1 is not true
        {"revoked": "true"},
        {"acls": ["get", "get"]},  # the same names as an accepted list, one twice
        {"type": "write", "acls": ["index", "index"]},
        {"acls": ["index"]},  # accepted for a write key before, not for a read key
        {"acls": None},
        {"rate_limit": "10/fortnight"},
        {"quota": 5000.0},
        {"expires": "2027-01-01T00:00:00Z", "ttl": "30d"},
        {"referers": ["https://*.example.com/*", "ftp://x"]},
        {"hashes": [hash_of(99)]},
        {"id": "k0"},  # an id used by the first key
        {"hash": hash_of(0)},
        {"description": "${TOKEN}"},
        {"nickname": "x"},
    ],
)
def test_a_value_next_to_accepted_ones_is_read_as_in_yaml(tmp_path: Path, bad: dict) -> None:
    """Remembered values never let a different one through: every line says what YAML says."""
    good = {"type": "read", "acls": ["get", "search"], "revoked": True}
    lines = [
        {"id": "k0", "hash": hash_of(0), **good},
        {"id": "k1", "hash": hash_of(1), "type": "write", "acls": ["index"]},
        {"id": "k2", "hash": hash_of(2), **good, **bad},
        {"id": "k3", "hash": hash_of(3), **good, **bad},
        {"id": "k4", "hash": hash_of(4), **good},
    ]
    from_file, from_yaml = _both(tmp_path, lines)
    if bad == {"revoked": "true"}:  # a quoted true is true, in YAML too
        assert [k._replace(line=0, file=None) for k in from_file] == [
            k._replace(line=0) for k in from_yaml
        ]
        assert from_file[2].revoked is True
        return
    assert from_file and isinstance(from_file[0], tuple), from_file
    # An earlier key is `keys.jsonl:1` in one file, `line 10` in the other.
    place = re.compile(re.escape(str(tmp_path / "keys.jsonl")) + r":(\d+)")
    from_file = [
        (line, where, place.sub(lambda m: f"line {int(m.group(1)) + 9}", message), hint)
        for line, where, message, hint in from_file
    ]
    yaml_lines = [(line - 9 if line else line, *rest) for line, *rest in from_yaml]
    assert from_file == yaml_lines
    assert {issue[0] for issue in from_file} == {3, 4}


def _same_as_yaml(tmp_path: Path, lines: list[dict]) -> list:
    """Load `lines` both ways and check they agree: the same keys, or the same issues
    (an earlier key is `keys.jsonl:1` in one file, `line 10` in the other)."""
    from_file, from_yaml = _both(tmp_path, lines)
    if from_file and isinstance(from_file[0], tuple) and not hasattr(from_file[0], "digest"):
        place = re.compile(re.escape(str(tmp_path / "keys.jsonl")) + r":(\d+)")
        from_file = [
            (line, where, place.sub(lambda m: f"line {int(m.group(1)) + 9}", message), hint)
            for line, where, message, hint in from_file
        ]
        assert from_file == [(line - 9 if line else line, *rest) for line, *rest in from_yaml]
    else:
        assert [k._replace(line=0, file=None) for k in from_file] == [
            k._replace(line=0) for k in from_yaml
        ]
    return from_file


@pytest.mark.parametrize(
    ("changed", "accepted"),
    [
        ({"acls": ["search", "get"]}, True),  # an accepted set, in another order
        ({"acls": []}, False),
        ({"acls": ["search", "search"]}, False),
        ({"acls": ["search", "get", "nope"]}, False),  # accepted names and one no route has
        ({"acls": [1]}, False),
        ({"acls": ["get", True]}, False),
        ({"acls": [["get"]]}, False),  # a list in the list
        ({"acls": [{"a": 1}]}, False),
        ({"type": "write"}, False),  # `get` only reads: never for a write key
        ({"type": ["read"]}, False),
        ({"type": None}, False),
        ({"referers": ["https://*.example.com/*", "https://app.example.com/*"]}, True),
        ({"referers": ["https://*.example.com/*", "https://*.example.com/*"]}, False),
        ({"referers": []}, False),
        ({"referers": ["https://${TOKEN}.example.com/*"]}, False),
        ({"referers": ["https://example.com/${TOKEN}/*"]}, False),  # no ${VAR} in keys
        ({"referers": ["https://example.com/$${x}/*"]}, True),  # `$${` is a literal `${`
        ({"referers": [f"https://h{n}.example.com/*" for n in range(101)]}, False),
        ({"referers": [f"https://h{n}.example.com/*" for n in range(100)]}, True),
        ({"referers": ["https://*.example.com/*", 1]}, False),
        ({"referers": ["https://user@example.com/*"]}, False),
        ({"hash": "sha256:" + "A" * 64}, True),  # upper-case hex is hex
        ({"hash": "SHA256:" + "a" * 64}, False),
        ({"hash": "sha256:" + "a" * 62 + " a"}, False),
        ({"hash": "sha256:" + "a" * 65}, False),
        ({"id": "has space"}, False),
        ({"id": "k" * 64}, True),
        ({"id": "k" * 65}, False),
        ({"id": "null"}, True),  # a JSON string, never a YAML null
        ({"description": 5}, True),  # YAML reads a number as its text
        ({"description": "costs $5"}, True),
        ({"description": None}, False),
        ({"ttl": 86400, "created": "2026-01-01T00:00:00Z"}, False),  # a duration has a unit
        ({"ttl": "1d", "created": "2026-01-01T00:00:00Z"}, True),
        ({"expires": ["2027-01-01"]}, False),
        ({"expires": 2027}, False),
    ],
)
def test_values_checked_without_nodes_are_read_as_in_yaml(
    tmp_path: Path, changed: dict, accepted: bool
) -> None:
    """The id, hash, ACLs and referers of every key are checked without the node reader:
    each line still loads, or is refused with the same issues, exactly as in YAML, also
    after the same value was accepted for an earlier key."""
    good = {"type": "read", "acls": ["get", "search"], "referers": ["https://*.example.com/*"]}
    lines = [
        {"id": "k0", "hash": hash_of(0), **good},
        {"id": "k1", "hash": hash_of(1), **good, **changed},
        {"id": "k2", "hash": hash_of(2), **good},
    ]
    result = _same_as_yaml(tmp_path, lines)
    assert bool(result) and hasattr(result[0], "digest") is accepted, result
    if not accepted:
        assert {issue[0] for issue in result} == {2}, result


def test_acls_are_read_as_in_yaml_when_a_route_is_unreadable(tmp_path: Path) -> None:
    """With a route unreadable no ACL is known: names are not checked, in either file."""
    base = BASE.replace("acl: delete}", "acl: Bad Name}")
    lines = [
        {"id": "k0", "hash": hash_of(0), "type": "read", "acls": ["nope"]},
        {"id": "k1", "hash": hash_of(1), "type": "read", "acls": ["nope", "nope"]},
    ]
    (tmp_path / "keys.jsonl").write_text("".join(json.dumps(k) + "\n" for k in lines))
    (tmp_path / "a.yaml").write_text(base + "keys_file: keys.jsonl\n")
    (tmp_path / "b.yaml").write_text(
        base + "keys:\n" + "".join(f"  - {json.dumps(k)}\n" for k in lines)
    )
    found = []
    for name in ("a.yaml", "b.yaml"):
        with pytest.raises(ConfigError) as caught:
            _load(tmp_path / name)
        found.append([(i.where, i.message) for i in caught.value.issues])
    assert found[0] == found[1]
    assert [where for where, _ in found[0]] == ["routes[3].acl", "keys[1].acls[1]"]


def test_many_keys_sharing_few_values_are_the_keys_yaml_would_give(tmp_path: Path) -> None:
    """Lists remembered by value: every key still gets its own, in any order of names."""
    acls = [["get", "search"], ["search", "get"], ["get"], ["search"]]
    lines = [
        {
            "id": f"k{n}",
            "hash": hash_of(n),
            "type": "read",
            **({"acls": acls[n % 4]} if n % 5 else {}),
            **({"referers": [f"https://c{n % 3}.example.com/*"]} if n % 2 else {}),
        }
        for n in range(60)
    ]
    keys = _same_as_yaml(tmp_path, lines)
    assert [sorted(k.acls) for k in keys[:4]] == [["get", "search"]] * 2 + [["get"], ["search"]]
    listed = [k.acls for n, k in enumerate(keys) if n % 5]
    assert len({id(names) for names in listed}) == 3  # one set object per distinct set


_YAML_KEYS = [
    "{id: a, hash: H0, type: read, acls: [~]}",  # a YAML null in a list
    "{id: null, hash: H0, type: read}",
    '{id: "null", hash: H0, type: read}',  # quoted: a text
    "&base {id: a, hash: H0, type: read, revoked: true}\n  - {<<: *base, id: b, hash: H1}",
    '{id: a, hash: H0, type: !!str read, "<<": x}',
    "{id: a, hash: H0, type: read, type: write}",
    '{id: a, hash: H0, type: read, description: "${TOKEN}"}',
    "{id: a, hash: H0, type: read, acls: &l [get]}\n  - {id: b, hash: H1, type: read, acls: *l}",
    "{id: a, hash: H0, type: read, acls: [get]}\n  - {id: b, hash: H0, type: read}",
    "{id: a, hash: H0, type: read, acls: [get]}\n  - {id: a, hash: H1, type: read}",
    "{id: a, hash: H0, type: read, revoked: yes}\n  - {id: b, hash: H1, type: read, revoked: yes}",
    "{id: a, hash: H0, type: read, ttl: 30d, created: 2026-01-01}",
    "{id: a, hash: H0, type: write, acls: [get]}",
    "{id: a, hash: H0, type: read, acls: [search, get], referers: [https://x.example/*]}",
    "{id: a, hash: H0, type: read, rate_limit: [10/second, 1000/hour], quota: 100/month}",
    "{id: a, hash: H0, type: read, rate_limit: [10/second, 20/second]}",
    "{id: a, hash: H0, type: read, fields: {exclude: [email]}}",
    "{id: a, hash: H0, type: read, acls: []}",
    "{id: a, hash: H0, type: read, acls: {get: 1}}",
    "{id: a, hash: H0, type: read, [x]: 1}",
]


@pytest.mark.parametrize("keys", _YAML_KEYS)
def test_yaml_keys_read_by_the_shortcut_are_the_keys_the_node_reader_gives(
    keys: str, monkeypatch
) -> None:
    """The YAML key list takes the keys file's shortcut for keys of plain values: with it
    and without it (every key read from its nodes) the same keys, or the same issues."""
    from keyproxy.config import keys_file, parse_config

    text = (
        BASE
        + "keys:\n  - "
        + keys.replace("H0", f'"{hash_of(0)}"').replace("H1", f'"{hash_of(1)}"')
        + "\n"
    )

    def load() -> object:
        try:
            return parse_config(text, "test.yaml", ENV).keys
        except ConfigError as error:
            return [(i.line, i.where, i.message, i.hint) for i in error.issues]

    with_shortcut = load()
    monkeypatch.setattr(keys_file, "_plain_values", lambda node: None)
    assert with_shortcut == load()


def test_the_handoff_rebuilds_a_fields_filter_that_refers_to_itself(tmp_path: Path) -> None:
    """A key's `fields` compiles to nodes that point back at themselves: the stream must
    carry them (a reload with any filtered key used to fail in the child)."""
    key = {"id": "f", "hash": hash_of(1), "type": "read", "fields": {"exclude": ["email"]}}
    config = _load(_write(tmp_path, [key]))
    (decoded,) = [s for s in handoff.decode_steps(handoff.encode(config)) if s is not None]
    flt = decoded.keys[0].fields
    assert flt.apply([{"id": 1, "email": "x"}]) == [{"id": 1}]


class _Calls:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.getpid, ())


def test_the_stream_builds_data_never_calls_a_function() -> None:
    import pickle

    forged = pickle.dumps(("refused", _Calls()))
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.getpid"):
        list(handoff.decode_steps(forged))


def test_a_parse_that_hangs_is_given_up_and_the_old_config_stays(
    tmp_path: Path, monkeypatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path, [{"id": "a", "hash": hash_of(1), "type": "read"}])
    holder = ConfigHolder(_load(path), str(path))
    keys = tmp_path / "keys.jsonl"
    keys.unlink()
    os.mkfifo(keys)  # nobody writes it: reading blocks, as a hung mount does
    monkeypatch.setattr(handoff, "CHILD_TIMEOUT", 1.0)
    outcome = asyncio.run(handoff.load_in_child(str(path)))
    assert isinstance(outcome, str) and "parsing took over 1s" in outcome
    assert not asyncio.run(holder.reload())
    assert [k.id for k in holder.config.keys] == ["a"]


def test_serve_reloads_a_configuration_whose_key_filters_fields(tmp_path: Path, upstream) -> None:
    """Through a real `keyproxy serve`: a filtered key survives the reload's handoff."""
    from tests.proxy_process import KEYS, base_config, digest, start_keyproxy
    from tests.test_lifecycle import wait_until

    newcomer = "pk_" + "7" * 64
    keys = tmp_path / "keys.jsonl"

    def write_keys(lines: list[dict]) -> None:
        tmp = tmp_path / "keys.jsonl.tmp"
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        tmp.replace(keys)

    reader = {"id": "reader", "hash": digest(KEYS["reader"]), "type": "read",
              "fields": {"exclude": ["path"]}}  # fmt: skip
    write_keys([reader])
    config = base_config(upstream.url, upstream.inject())
    config["keys"] = []
    config["keys_file"] = str(keys)
    kp = start_keyproxy(tmp_path, config)
    try:
        status, _, body, _ = kp.request("GET", "/echo/x", key=KEYS["reader"])
        assert status == 200 and b'"path"' not in body
        write_keys([reader, {"id": "newcomer", "hash": digest(newcomer), "type": "read"}])
        assert wait_until(lambda: kp.request("GET", "/echo/x", key=newcomer)[0] == 200, 10.0)
        status, _, body, _ = kp.request("GET", "/echo/x", key=KEYS["reader"])
        assert status == 200 and b'"path"' not in body
    finally:
        kp.stop()
