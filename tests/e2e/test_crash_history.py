"""Crash safety of the history: the real ``nopf-web``, killed with SIGKILL many times while
its sessions start, move data and end.

"Nothing committed is lost" is defined through the API: every session whose
creation was answered 201, and whose end an answer showed before the kill, is
in the history after the restart with that outcome; every session that was
certainly still running (a waiting sharer, a connected pair moving data, never
asked to stop) is ``interrupted``; the database opens every time.

Each round: ``nopf-web`` starts on the database of the previous round (which
must open and hold what the previous round saw), a worker thread drives a
workload through the JSON API (a sharer on a loopback echo service, a client
with its code, bytes through the tunnel, a doomed client with an unknown code,
stops), and the process is killed after a random delay.
``NOPF_CRASH_KILLS`` sets the number of kills (default 30).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.loopback import echo_service
from tests.programs import argv, free_port

KILLS = int(os.environ.get("NOPF_CRASH_KILLS", "30"))


@dataclass
class Tracked:
    """One session as the workload saw it through the API."""

    id: str
    kind: str  # "sharer" | "client" | "doomed"
    outcome: str | None = None  # an answer showed this end
    may_end: bool = False  # asked to stop, or its peer was: it may have ended unseen
    partner: Tracked | None = None


@dataclass
class Round:
    sessions: dict[str, Tracked] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_echoed: int = 0
    errors: list[str] = field(default_factory=list)
    killing: threading.Event = field(default_factory=threading.Event)  # set before SIGKILL


class Api:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def start(db: Path) -> tuple[subprocess.Popen[str], str, IO[str]]:
    err = open(db.parent / "stderr.log", "a")  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen(
        argv("nopf-web", "--db", str(db), "--port", "0", "--rendezvous-listen", "127.0.0.1:0",
             "--no-guard", "--punch-timeout", "5"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()  # type: ignore[union-attr]
                                                          ), daemon=True)
    reader.start()
    reader.join(30)
    if not ready or not ready[0].startswith("http://"):
        proc.kill()
        proc.wait()
        err.flush()
        raise AssertionError("nopf-web did not start: "
                             + (db.parent / "stderr.log").read_text()[-2000:])
    return proc, ready[0].strip(), err


def wait_for(api: Api, sid: str, check: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, data = api.call("GET", f"/api/sessions/{sid}")
        assert status == 200, data
        if check(data):
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"session {sid}: still {data['state']}")
        time.sleep(0.05)


def workload(api: Api, echo_port: int, rnd: Round, rng: random.Random) -> None:
    """Sessions through the API until the process dies under it."""
    def created(kind: str, body: dict[str, Any], *, may_end: bool = False) -> Tracked:
        status, data = api.call("POST", "/api/sessions", body)
        assert status == 201, data
        tracked = Tracked(data["id"], kind, may_end=may_end)
        with rnd.lock:
            rnd.sessions[tracked.id] = tracked
        return tracked

    def ended(t: Tracked, data: dict[str, Any]) -> None:
        if data.get("outcome"):
            with rnd.lock:
                t.outcome = data["outcome"]

    def stop(t: Tracked) -> None:
        with rnd.lock:
            t.may_end = True
            if t.partner is not None:
                t.partner.may_end = True
        status, data = api.call("DELETE", f"/api/sessions/{t.id}")
        assert status == 200, data
        ended(t, data)

    try:
        while True:
            sharer = created("sharer", {"role": "server", "local_port": echo_port,
                                        "label": "crash test"})
            data = wait_for(api, sharer.id, lambda d: d["code"])
            port = free_port()
            with rnd.lock:  # pairing may fail on its own (a punch timeout on a busy
                sharer.may_end = True  # machine) until both are seen connected
            client = created("client", {"role": "client", "local_port": port,
                                        "code": data["code"]}, may_end=True)
            sharer.partner, client.partner = client, sharer
            wait_for(api, client.id, lambda d: d["state"] == "connected")
            wait_for(api, sharer.id, lambda d: d["state"] == "connected")
            with rnd.lock:  # a connected pair moving data: certainly running from now
                sharer.may_end = client.may_end = False
            for _ in range(rng.randint(1, 4)):  # bytes through the tunnel and back
                payload = os.urandom(rng.randint(1, 256 * 1024))
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    conn.sendall(payload)
                    conn.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := conn.recv(1 << 16):
                        got += chunk
                assert got == payload
                with rnd.lock:
                    rnd.bytes_echoed += len(got)
            if rng.random() < 0.5:
                doomed = created("doomed", {"role": "client", "local_port": free_port(),
                                            "code": "999999-orbit-lantern"})
                with rnd.lock:
                    doomed.may_end = True  # it fails on its own (no such code)
                ended(doomed, wait_for(api, doomed.id, lambda d: d["outcome"]))
            for t in rng.sample([sharer, client], rng.randint(0, 2)):
                stop(t)
                if t.partner is not None and rng.random() < 0.5:
                    ended(t.partner, wait_for(api, t.partner.id, lambda d: d["outcome"]))
    except (OSError, urllib.error.URLError, ConnectionError, AssertionError,
            TimeoutError) as exc:
        if rnd.killing.is_set():
            return  # the process was killed under us (a cut echo, a refused call): expected
        with rnd.lock:
            rnd.errors.append(repr(exc)[:500])


def check_round(api: Api, rnd: Round) -> tuple[int, int]:
    """The previous round's sessions, as the restarted dashboard has them; (sessions
    checked, of which interrupted)."""
    status, data = api.call("GET", "/api/history?limit=1000")
    assert status == 200, data
    history = {s["id"]: s for s in data["sessions"]}
    interrupted = 0
    for t in rnd.sessions.values():
        assert t.id in history, f"session {t.id} ({t.kind}) was answered 201 and is lost"
        got = history[t.id]["outcome"]
        if t.outcome is not None:
            assert got == t.outcome, (t, history[t.id])
        elif not t.may_end:
            assert got == "interrupted", (t, history[t.id])
            assert "stopped while this session was running" in history[t.id]["error"]
        else:
            assert got in ("interrupted", "stopped", "closed", "failed"), (t, history[t.id])
        interrupted += got == "interrupted"
    return len(rnd.sessions), interrupted


def test_sigkill_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    rng = random.Random(15)
    previous: Round | None = None
    totals = {"kills": 0, "sessions": 0, "interrupted": 0, "ended_seen": 0, "bytes": 0}
    with echo_service() as echo_port:
        for _ in range(KILLS + 1):
            proc, url, err = start(db)
            try:
                api = Api(url)
                if previous is not None:
                    checked, interrupted = check_round(api, previous)
                    totals["sessions"] += checked
                    totals["interrupted"] += interrupted
                    totals["ended_seen"] += sum(t.outcome is not None
                                                for t in previous.sessions.values())
                    totals["bytes"] += previous.bytes_echoed
                if totals["kills"] == KILLS:
                    break
                rnd = Round()
                worker = threading.Thread(target=workload, args=(api, echo_port, rnd, rng),
                                          name="crash-workload", daemon=True)
                worker.start()
                time.sleep(rng.uniform(0.2, 3.0))
                rnd.killing.set()
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                totals["kills"] += 1
                worker.join(30)
                assert not worker.is_alive()
                assert not rnd.errors, rnd.errors
                previous = rnd
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)
                err.close()
    print(f"crash test: {totals}")
    assert totals["kills"] == KILLS
    assert totals["interrupted"] > 0 and totals["ended_seen"] > 0 and totals["bytes"] > 0
