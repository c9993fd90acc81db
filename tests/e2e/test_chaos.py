"""Chaos through the real programs: ``nopf share`` and ``nopf connect`` on loopback,
600 connections of mixed behaviour at once against a service that misbehaves too.

Applications connect and close at once, reset at once, send and reset, half-close,
or echo; the service echoes, closes at once, resets at once, floods and closes, or
answers late. Nothing is checked byte for byte here (the soak does that): what
must hold is that neither end fails, each gives back every file it opened, no
connection to the service stays open, and both exit 0 on SIGTERM. Two failures
this found: a third of the connections dropped at once left their connection to
the service open for ever, and a sharer failed in one run of three ("File
descriptor N is used by transport", EBADF, a libuv abort).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.programs import argv, free_port

from .unruly import CLIENT_KINDS, unruly_client, unruly_service

pytestmark = pytest.mark.linux_only("counts open files in /proc")

CONNECTIONS = 600


def _files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _says(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text()


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def test_mixed_connections_against_an_unruly_service_leave_both_ends_whole(
        tmp_path: Path) -> None:
    rng = random.Random(2026)
    rdv, app_port = free_port(), free_port()
    with unruly_service(seed=7) as (service, service_conns), \
            open(tmp_path / "server.err", "w") as server_err, \
            open(tmp_path / "share.err", "w") as share_err, \
            open(tmp_path / "connect.err", "w") as connect_err:
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            procs["nopf-server"] = subprocess.Popen(
                argv("nopf-server", "--host", "127.0.0.1", "--port", str(rdv)),
                stdout=subprocess.DEVNULL, stderr=server_err, text=True)
            addr = f"127.0.0.1:{rdv}"
            share = procs["nopf share"] = subprocess.Popen(
                argv("nopf", "share", "-p", str(service), "-a", addr, "--no-port-mapping"),
                stdout=subprocess.PIPE, stderr=share_err, stdin=subprocess.DEVNULL, text=True)
            assert share.stdout is not None
            code = share.stdout.readline().strip()  # the rendezvous may take a moment
            assert code, (tmp_path / "share.err").read_text()
            procs["nopf connect"] = subprocess.Popen(
                argv("nopf", "connect", code, "-p", str(app_port), "-a", addr,
                     "--no-port-mapping"),
                stdout=subprocess.DEVNULL, stderr=connect_err, stdin=subprocess.DEVNULL,
                text=True)
            for err in ("share.err", "connect.err"):
                _until(_says(tmp_path / err, "encrypted tunnel to"), 20, f"the tunnel in {err}")
            before = {name: _files(p.pid) for name, p in procs.items()}
            threads = [threading.Thread(target=unruly_client, args=(
                app_port, rng.choice(CLIENT_KINDS), rng.randint(1, 200_000)), daemon=True)
                for _ in range(CONNECTIONS)]
            for i, thread in enumerate(threads):
                thread.start()
                if i % 50 == 49:
                    time.sleep(0.05)  # bursts of fifty, as a browser's pages
            for thread in threads:
                thread.join(30)
            assert not any(t.is_alive() for t in threads), "clients still running"
            assert {n: p.poll() for n, p in procs.items()} == dict.fromkeys(procs), \
                "a program ended under the chaos"
            _until(lambda: all(c.fileno() < 0 for c in service_conns), 15,
                   "every connection to the service to close")
            _until(lambda: {n: _files(p.pid) for n, p in procs.items()} == before, 15,
                   f"each program to give back its files (before: {before})")
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            codes = {}
            for name, p in procs.items():
                try:
                    codes[name] = p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[name] = p.wait(5)
    errors = {n: (tmp_path / f"{n}.err").read_text() for n in ("share", "connect")}
    assert codes == dict.fromkeys(codes, 0), (codes, errors)
    assert not [n for n, text in errors.items() if "Traceback" in text], errors
    assert len(service_conns) >= CONNECTIONS // 3  # the service saw its share of them
