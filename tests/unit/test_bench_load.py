"""The request-rate benchmark's helpers: its load process (``python -m bench.paths
load``) against real services on loopback, which counts answered requests and
refuses wrong answers, and the parsing of its ``--paths``."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import serve_conn
from bench.paths import path_list, path_names
from tests.loopback import tcp_service

ROOT = Path(__file__).resolve().parents[2]


def load(port: int, conns: int, seconds: float = 0.3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.paths", "load", "127.0.0.1", str(port), str(conns),
         str(seconds), "64"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)


def test_the_load_counts_answered_requests_on_every_connection() -> None:
    with tcp_service(serve_conn) as port:
        proc = load(port, conns=4)
    assert proc.returncode == 0, proc.stderr
    answered, seconds = proc.stdout.split()
    assert int(answered) > 4 and 0.3 <= float(seconds) < 5


def test_a_wrong_answer_fails_the_load_with_one_line() -> None:
    def garbling(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data[1:] + b"!" if len(data) > 1 else data)

    with tcp_service(garbling) as port:
        proc = load(port, conns=2)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "load: an answer differs from its request"


def test_a_service_that_hangs_up_fails_the_load_with_one_line() -> None:
    def hanging_up(conn: socket.socket) -> None:
        conn.recv(1)
        conn.close()

    with tcp_service(hanging_up) as port:
        proc = load(port, conns=1)
    assert proc.returncode != 0
    # Its end is an EOF or a reset (the request was unread when it closed).
    assert proc.stderr.strip() in (
        "load: the path closed a connection in the middle of the run",
        "load: a connection failed: Connection reset by peer")


def test_nothing_listening_fails_the_load_with_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = load(port, conns=1)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "load: a connection failed: Connection refused"


def test_path_names_are_checked_before_any_lab_starts() -> None:
    assert path_names(" direct, encrypted ,ssh_gcm") == ("direct", "encrypted", "ssh_gcm")
    with pytest.raises(ValueError, match=r"^--paths: unknown path sshh, foo; choose from direct"):
        path_names("direct,sshh,foo")
    with pytest.raises(ValueError, match=r"^NOPF_BENCH_PATHS: no path named; choose from"):
        path_names(" , ", "NOPF_BENCH_PATHS")
    # As an argparse type (--paths): the same line, after argparse's own prefix.
    with pytest.raises(argparse.ArgumentTypeError, match=r"^unknown path foo; choose from"):
        path_list("foo")
