"""What an operator meets: start-up errors, reload events, the new user's papercuts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from keyproxy.config import ConfigError, parse_config
from tests.procs import free_port, spawn
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, start_keyproxy
from tests.test_observe import by_name, samples, scrape

UPSTREAM = "http://127.0.0.1:3000"
INJECT = {"headers": {"X-K": "k-upstream-secret-value"}}


def keyproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keyproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr + result.stdout
    output = (result.stderr + result.stdout).strip()
    assert output.count("\n") == 0, output
    return output


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- start-up and CLI errors ---------------------------------------------------------


def test_unusable_config_files_get_one_line_naming_the_option(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cases = {
        str(tmp_path / "missing.yaml"): "No such file",
        str(tmp_path): "Is a directory",
        str(empty): "the file is empty",
    }
    for path, problem in cases.items():
        line = one_line_error(keyproxy("serve", "-c", path))
        assert problem in line and path in line
        if problem != "the file is empty":
            assert "-c/--config" in line


@pytest.mark.parametrize("workers", ["0", "abc", "-3", "100000"])
def test_a_bad_workers_count_is_one_line(tmp_path, workers):
    path = write(tmp_path / "c.yaml", base_config(UPSTREAM, INJECT))
    line = one_line_error(keyproxy("serve", "-c", str(path), "--workers", workers))
    assert line.startswith(f"--workers {workers!r}: expected a whole number from 1 to")


def test_a_second_instance_names_the_admin_listen_to_change(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    first = start_keyproxy(tmp_path, config)
    try:
        second = dict(config, server=dict(config["server"], listen=f"127.0.0.1:{free_port()}"))
        path = write(tmp_path / "second.yaml", second)
        line = one_line_error(keyproxy("serve", "-c", str(path)))
        assert line.startswith("keyproxy: admin port ") and " is in use" in line
        assert config["server"]["admin_listen"] in line
        assert f"set server.admin_listen in {path}" in line
        assert first.process.returncode is None  # the first one is untouched
    finally:
        first.stop()


# -- papercuts ------------------------------------------------------------------------


def test_check_says_one_key_and_notes_an_expired_key(tmp_path):
    config = base_config(UPSTREAM, INJECT)
    config["keys"] = [k for k in config["keys"] if k["id"] == "expired"]
    result = keyproxy("check", "-c", str(write(tmp_path / "c.yaml", config)))
    assert result.returncode == 0
    assert result.stdout.startswith("OK: 1 key, ")
    assert "key 'expired' expired on 2020-01-01 00:00 UTC" in result.stderr
    assert "TOKEN_EXPIRED" in result.stderr


def test_keygen_refuses_an_id_check_would_refuse():
    line = one_line_error(keyproxy("keygen", "--id", "bad id!"))
    assert "letters, digits" in line
    assert "pk_" not in line and "sk_" not in line  # no key was made


def test_a_misindented_line_gets_a_hint_not_pyyaml_text():
    text = "upstream:\n  url: http://x\n routes:\n  - {match: 'GET /a', acl: r}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml", {})
    (issue,) = caught.value.issues
    assert issue.line == 3 and "indentation" in issue.message
    assert issue.hint and "column 2" in issue.hint


def test_an_unset_variable_gets_the_similar_name_that_is_set():
    text = (
        "upstream:\n  url: http://x\n  inject:\n    headers: {X-K: '${BACKEND_SECRT}'}\n"
        "routes:\n  - {match: 'GET /a', acl: r}\n"
    )
    env = {"BACKEND_SECRET": "the-real-secret-value", "HOME": "/root"}
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml", env)
    (issue,) = caught.value.issues
    assert issue.hint == "did you mean ${BACKEND_SECRET}? (BACKEND_SECRET is set)"
    assert "the-real-secret-value" not in str(caught.value)


def test_listen_without_a_host_means_every_interface():
    text = "server:\n  listen: :8080\nupstream:\n  url: http://x\n"
    text += "routes:\n  - {match: 'GET /a', acl: r}\n"
    assert str(parse_config(text, "c.yaml", {}).server.listen) == "0.0.0.0:8080"


def test_explain_numbers_every_step_and_says_rate_limits_are_not_live(tmp_path):
    config = base_config(UPSTREAM, {"query": {"apikey": "very-secret-upstream-value-123"}})
    config["keys"][0]["rate_limit"] = "5/minute"
    path = str(write(tmp_path / "c.yaml", config))
    text = keyproxy("explain", "-c", path, "--key", KEYS["reader"], "GET", "/v1/data/posts?a=1")
    assert text.returncode == 0, text.stdout
    numbers = [line.split()[1] for line in text.stdout.splitlines()[1:9]]
    assert numbers == [str(n) for n in range(1, 9)]
    assert "not evaluated offline" in text.stdout and "4 left" not in text.stdout

    result = keyproxy(
        "explain", "-c", path, "--json", "--key", KEYS["reader"], "GET", "/v1/data/posts?a=1"
    )
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert [s["step"] for s in data["steps"]] == list(range(1, 9))
    assert {s["result"] for s in data["steps"]} <= {"pass", "skip"}
    assert data["verdict"] == "allow"
    assert data["forward"]["url"] == "http://127.0.0.1:3000/v1/data/posts?a=1&apikey=[REDACTED]"
    assert "very-secret-upstream-value-123" not in result.stdout
    assert KEYS["reader"] not in result.stdout

    denied = keyproxy(
        "explain", "-c", path, "--json", "--key", KEYS["reader"], "DELETE", "/v1/data/posts/1"
    )
    assert denied.returncode == 1
    data = json.loads(denied.stdout)
    assert (data["verdict"], data["status"], data["code"]) == ("deny", 403, "PERMISSION_DENIED")
    assert data["steps"][-1]["result"] == "deny" and "forward" not in data


# -- reloads, as the running process sees them ------------------------------------------


def events(process, name: str) -> list[dict]:
    out = []
    for line in process.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out


def wait_for(check, timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_refused_reload_is_logged_as_check_prints_it_and_counted(tmp_path, upstream):
    kp = start_keyproxy(tmp_path, base_config(upstream.url, upstream.inject()))
    try:
        text = kp.config_path.read_text().replace("type: read", "type: reed", 1)
        edited = kp.config_path.with_suffix(".new")  # replaced by a rename, as editors save
        edited.write_text(text)
        edited.replace(kp.config_path)
        refused = wait_for(lambda: [e for e in events(kp.process, "config_reload")])
        assert refused and refused[0]["result"] == "error"
        (error,) = refused[0]["errors"]
        assert error.startswith(f"{kp.config_path}:")
        assert ": keys[0].type: " in error and "ConfigIssue(" not in error
        found = samples(scrape(kp))
        reloads = by_name(found, "keyproxy_config_reloads_total")
        assert {dict(lb)["result"]: v for lb, v in reloads.items()} == {"success": 0, "error": 1}
        # still serving the last good configuration
        assert kp.request("GET", "/v1/data/posts", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()


def test_a_deleted_config_file_is_logged(tmp_path, upstream):
    kp = start_keyproxy(tmp_path, base_config(upstream.url, upstream.inject()))
    try:
        kp.config_path.unlink()
        gone = wait_for(lambda: events(kp.process, "config_missing"))
        assert gone and gone[0]["path"] == str(kp.config_path)
        assert kp.request("GET", "/v1/data/posts", key=KEYS["reader"])[0] == 200
        kp.rewrite_config(kp.config)
        assert wait_for(lambda: events(kp.process, "config_back"))
    finally:
        kp.stop()


def test_a_configmap_symlink_swap_is_reloaded(tmp_path, upstream):
    """Kubernetes mounts a ConfigMap as `config.yaml -> ..data/config.yaml`, `..data ->
    ..<timestamp>/`, and updates it by pointing `..data` at a new directory (a rename)."""
    mount = tmp_path / "configmap"
    mount.mkdir()
    config = base_config(upstream.url, upstream.inject())
    new_key = "pk_" + "8" * 64

    def publish(version: str, content: dict) -> None:
        target = mount / f"..{version}"
        target.mkdir()
        write(target / "config.yaml", content)
        link = mount / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, mount / "..data")  # the atomic swap kubelet does

    publish("2026_12_04_01", config)
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    argv = [sys.executable, "-m", "keyproxy", "serve", "-c", str(mount / "config.yaml")]
    process, _ = spawn(argv, ready=r'"event":"listening"', ready_stream="stderr", name="kp")
    try:
        kp = Keyproxy(process, mount / "config.yaml", config)
        assert kp.request("GET", "/v1/data/posts", key=new_key)[0] == 401
        updated = dict(
            config, keys=[*config["keys"], {"id": "new", "hash": digest(new_key), "type": "read"}]
        )
        publish("2026_12_04_02", updated)
        assert wait_for(lambda: events(process, "config_reload"))
        reload = events(process, "config_reload")[0]
        assert reload["result"] == "success", reload
        assert kp.request("GET", "/v1/data/posts", key=new_key)[0] == 200
    finally:
        process.stop()
