"""``bench.pump_floor`` (the floor of a Python encrypted relay) and ``bench.pump_layers``,
on loopback only.

Every mode (and some of ``--mode alloc``'s ``--habits``), and the thread relay
carrying the tunnel's layers, relay 8 MiB each way byte for byte through a near
and a far end run as processes, with half-closes carried end to end; the far
end forwards a record sealed by the documented format and drops the connection
on a tampered one without forwarding any of it. ``bench.buffer_cost`` reports
each sender it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import buffer_cost, pump_floor as pf

ROOT = Path(__file__).resolve().parents[2]
SIZE = 8 << 20
PSK = bytes(range(32))
MODES = ("thread", "async", "alloc")


def _start(end: str, mode: str, to: tuple[str, int]) -> tuple[subprocess.Popen[bytes], int]:
    """A relay end (mode "layers": ``bench.pump_layers``); its port once it listens."""
    where = ["--listen", "127.0.0.1:0", "--to", f"{to[0]}:{to[1]}"]
    mode, _, habits = mode.partition(":")  # "alloc:HABITS": --mode alloc --habits HABITS
    where += ["--habits", habits] if habits else []
    command = (["bench.pump_layers", end, *where] if mode == "layers" else
               ["bench.pump_floor", end, "--mode", mode, *where, "--key", PSK.hex()])
    proc = subprocess.Popen([sys.executable, "-m", *command],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("listening "):
        raise AssertionError(f"{command[0]} {end} did not start: {line!r}; {_stop(proc)}")
    return proc, int(line.rsplit(":", 1)[1])


def _stop(*procs: subprocess.Popen[bytes]) -> str:
    """Kill the relays; what they said on stderr (for a failing assertion)."""
    logs = []
    for proc in procs:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        logs.append(err.decode(errors="replace")[-400:])
    return " | ".join(logs)


@pytest.fixture
def service() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(10)
        yield lsock


def _read_all(sock: socket.socket) -> tuple[int, str]:
    h, total = hashlib.sha256(), 0
    while data := sock.recv(1 << 16):
        h.update(data)
        total += len(data)
    return total, h.hexdigest()


def _send_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


# Some of alloc's habits only (bench.buffer_cost): a pool of reused read buffers
# sealed in place, fresh reads copied but not kept (glibc's malloc untuned), and
# fresh reads sealed from two parts by a streaming encryptor.
HABITS = ("alloc:keep", "alloc:fresh,copy", "alloc:fresh,keep,scatter")


@pytest.mark.parametrize("mode", [*MODES, *HABITS, "layers"])
def test_both_directions_byte_exact_with_half_close(mode: str,
                                                    service: socket.socket) -> None:
    far, far_port = _start("far", mode, service.getsockname())
    relays = [far]
    up, down = os.urandom(SIZE), os.urandom(SIZE)
    got: dict[str, tuple[int, str]] = {}
    try:
        near, near_port = _start("near", mode, ("127.0.0.1", far_port))
        relays.append(near)

        def serve() -> None:
            conn, _ = service.accept()
            with conn:
                conn.settimeout(20)
                sender = threading.Thread(target=_send_then_eof, args=(conn, down))
                sender.start()
                got["service"] = _read_all(conn)  # ends at the client's half-close
                sender.join()

        server = threading.Thread(target=serve)
        server.start()
        with socket.create_connection(("127.0.0.1", near_port), timeout=20) as client:
            sender = threading.Thread(target=_send_then_eof, args=(client, up))
            sender.start()
            got["client"] = _read_all(client)  # ends at the service's half-close
            sender.join()
        server.join(20)
    finally:
        logs = _stop(*reversed(relays))
    assert got.get("service") == (SIZE, hashlib.sha256(up).hexdigest()), logs
    assert got.get("client") == (SIZE, hashlib.sha256(down).hexdigest()), logs


def _raw_far(mode: str, service: socket.socket, records: bytes) -> tuple[bytes, bytes]:
    """Talk to a far end as a near end would (salt, then ``records``, then EOF):
    (what the service received, what came back to us)."""
    far, far_port = _start("far", mode, service.getsockname())
    salt = bytes(pf.SALT)
    try:
        with socket.create_connection(("127.0.0.1", far_port), timeout=10) as raw:
            raw.sendall(salt + records)
            conn, _ = service.accept()
            with conn:
                conn.settimeout(10)
                received = b""
                while data := _recv(conn):
                    received += data
            back = b""
            while data := _recv(raw):
                back += data
    finally:
        _stop(far)
    return received, back


def _recv(sock: socket.socket) -> bytes:
    """One read; a reset (the far end dropping the connection) reads as EOF."""
    try:
        return sock.recv(1 << 16)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("mode", MODES)
def test_far_end_opens_documented_records_and_rejects_a_tampered_one(
        mode: str, service: socket.socket) -> None:
    salt = bytes(pf.SALT)
    hello = pf.seal(PSK, salt, "n2f", 0, b"hello")
    end = pf.seal(PSK, salt, "n2f", 1, b"")
    received, back = _raw_far(mode, service, hello + end)
    assert received == b"hello"
    # The service closed after our end record: the far end's own end record comes
    # back, sealed with the other direction's key and counter 0.
    assert len(back) == pf.HEADER + pf.TAG
    assert int.from_bytes(back[:pf.HEADER], "big") == pf.TAG
    f2n = AESGCM(pf.direction_key(PSK, salt, "f2n"))
    assert f2n.decrypt((0).to_bytes(pf.NONCE, "big"), back[pf.HEADER:], None) == b""

    tampered = bytearray(hello)
    tampered[pf.HEADER + 2] ^= 1  # one bit of the ciphertext
    received, back = _raw_far(mode, service, bytes(tampered) + end)
    assert received == b""
    assert back == b""



def test_buffer_cost_measures_each_sender(tmp_path: Path) -> None:
    """``bench.buffer_cost`` carries data through a floor near end and the real
    tunnel and reports each sender's CPU and faults per GB."""
    out = tmp_path / "run.json"
    only = "one reused buffer,tunnel: glibc defaults"
    # 64 MB: enough CPU time to register in /proc ticks (10 ms) even on a fast run.
    proc = subprocess.Popen([sys.executable, "-m", "bench.buffer_cost", "--size-mb", "64",
                             "--rounds", "1", "--only", only, "--json", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # SIGINT, not run()'s SIGKILL: its finally then stops the relays it started.
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait(5)
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-400:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"floor: one reused buffer", "tunnel: glibc defaults"}
    for row in rows.values():
        assert row["mb_s"] > 0
        assert row["user_s_per_gb"] + row["system_s_per_gb"] > 0
    # How many faults the tunnel takes without its mallopt depends on when glibc trims
    # (36k-58k per GB in most 64 MB runs, none in one loaded run; some 9k since local
    # reads go into reused slabs): the reading itself is checked below, on a process
    # whose faults are known.


def test_proc_stat_counts_a_processs_cpu_and_faults() -> None:
    """The reading ``bench.buffer_cost`` takes: a child that touches 64 MiB of fresh
    memory page by page and spins for 0.3 s shows at least that many faults and CPU."""
    touch = ("import mmap, time\n"
             "m = mmap.mmap(-1, 64 << 20)\n"
             "for i in range(0, 64 << 20, 4096): m[i] = 1\n"
             "end = time.process_time() + 0.3\n"
             "while time.process_time() < end: pass\n"
             "input()\n")
    child = subprocess.Popen([sys.executable, "-c", touch], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            user, system, faults = buffer_cost.proc_stat(child.pid)
            if user + system >= 0.3 and faults >= (64 << 20) // 4096:
                break
            assert time.monotonic() < deadline, (user, system, faults)
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait(5)
