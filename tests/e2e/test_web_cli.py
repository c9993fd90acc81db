"""``nopf-web`` as a user runs it: the printed URL, one-line errors, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.programs import free_port

BIN = Path(sys.executable).parent


def nopf_web(*args: str) -> list[str]:
    script = BIN / "nopf-web"
    return [str(script), *args] if script.exists() else [
        sys.executable, "-m", "nopf_web.cli.web", *args]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nopf_web(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          *words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nopf-web: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("args, words", [
    (["--port", "http"], ["--port"]),
    (["--port", "70000"], ["--port"]),
    (["--rendezvous", "nowhere"], ["nowhere"]),
    (["--rendezvous-listen", "127.0.0.1"], ["--rendezvous-listen"]),
    (["--punch-timeout", "-1"], ["--punch-timeout"]),
    (["--host", ""], ["--host"]),
    (["--bogus"], ["unrecognized"]),
])
def test_bad_arguments_are_one_line_and_exit_2(
        tmp_path: Path, args: list[str], words: list[str]) -> None:
    assert_one_line_error(run("--db", str(tmp_path / "h.db"), *args), 2, *words)


def test_a_corrupt_database_is_one_line_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    db.write_bytes(b"this is not sqlite" * 100)
    result = run("--db", str(db), "--port", "0", "--rendezvous-listen", "127.0.0.1:0")
    assert_one_line_error(result, 1, str(db), "not a usable")
    assert db.read_bytes() == b"this is not sqlite" * 100


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("--db", str(tmp_path / "h.db"), "--port", str(port),
                     "--rendezvous-listen", "127.0.0.1:0")
        assert_one_line_error(result, 1, "--port", str(port))
        result = run("--db", str(tmp_path / "h.db"), "--port", "0",
                     "--rendezvous-listen", f"127.0.0.1:{port}")
        assert_one_line_error(result, 1, "embedded rendezvous", "--rendezvous")


def test_prints_the_url_serves_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(nopf_web("--port", "0", "--rendezvous-listen", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        with urllib.request.urlopen(url + "api/sessions", timeout=5) as resp:
            assert json.load(resp) == {"sessions": []}
        with urllib.request.urlopen(url + "settings", timeout=5) as resp:
            assert str(tmp_path / "xdg" / "nopf" / "history.sqlite3") in resp.read().decode()
        # Not HTTP (raw UTF-8 in the query): a 400, and one line in the log.
        host, port = url[len("http://"):-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall("GET /history.json?limit=² HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert raw.recv(100).split(b" ")[1] == b"400"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "Error handling request from 127.0.0.1: Invalid char in url query" in err, err
    assert (tmp_path / "xdg" / "nopf" / "history.sqlite3").exists()


def test_lan_mode_prints_a_url_with_the_token(tmp_path: Path) -> None:
    port = free_port()
    # LAN mode needs a non-loopback bind; every request below still goes to 127.0.0.1.
    proc = subprocess.Popen(nopf_web("--host", "0.0.0.0", "--port", str(port), "--db",
                                     str(tmp_path / "h.db"), "--rendezvous-listen",
                                     "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/sessions", timeout=5)
        assert refused.value.code == 401
        token = url.split("token=")[1]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/sessions",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
