"""Where a coordinated setup's round trips go: per-phase instants of real sessions.

Runs a sharer ``CoordinatedEngine`` in a1 (its service records when the first
byte arrives) and, once the code is out, a connector ``CoordinatedEngine`` in b1
whose application connects at once and sends one byte. All instants are
``time.monotonic()`` in one process, measured from "both peers ready" (the
sharer waits with its code, the connector starts).

Phases (connector side): ``probed`` NAT mapping check done (skipped by a
joiner), ``rdv_connected`` coordination connection up, ``hello_sent``,
``fire`` instruction received, ``connected`` TCP tunnel up, ``secured`` the
peer's key confirmation checked (with SPAKE2 through the rendezvous the first
bytes leave before it, so ``byte`` may come first).

    sudo .venv/bin/python -m tests.e2e.coord_setup_timing [--delay-ms 20] [--runs 5] \
        [--tfo off|on|both]

``--tfo`` sets ``net.ipv4.tcp_fastopen`` in the rendezvous' namespace (on: the
connector's hello rides in its SYN); ``both`` alternates off/on run by run in
one lab, so the two are compared under the same conditions.

Before/after a change: run it alternately from two checkouts (``git archive
REV | tar -x -C DIR``, then ``cd DIR`` and the same command with ``--json``),
and compare the pooled medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import queue
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from nopf_web.errors import NopfError
from nopf_web.sessions.coordinated import CoordinatedEngine, CoordinatedSpec
from nopf_web.wire.address import Endpoint
from tests.lab import Host, Lab

from .coord_harness import RDV, handshake_rtt
from .peers import start_rendezvous

SERVICE_PORT = 3000
CONNECTOR_PORT = 3010
_CTX = multiprocessing.get_context("fork")  # the child inherits the lab objects
PHASES = ("probed", "rdv_connected", "hello_sent", "fire", "connected", "secured", "byte")


@dataclass
class Run:
    ready: float  # connector started (the sharer is waiting with its code)
    joiner: dict[str, float]  # phase -> instant, on the connector
    sharer: dict[str, float]
    byte: float  # the application's first byte reached the sharer's service

    def offsets(self) -> dict[str, float]:
        """Seconds from ready to each connector phase (and the byte at the service)."""
        out = {k: v - self.ready for k, v in self.joiner.items()}
        out["byte"] = self.byte - self.ready
        return out


def _phases(session: CoordinatedEngine) -> dict[str, float]:
    t = session.timings
    got: dict[str, float] = {}
    if t is not None:
        if t.probed is not None:
            got["probed"] = t.probed
        if t.rdv_connected:
            got["rdv_connected"] = t.rdv_connected
        got.update(hello_sent=t.hello_sent, fire=t.fire, connected=t.connected)
    if session.secured_at is not None:
        got["secured"] = session.secured_at
    return got


def _sharer_main(code_q: Queue[str], out_q: Queue[tuple[str, object]], stop: Event,
                 timeout: float) -> None:
    async def main() -> None:
        async def service(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read(1)
            if data:
                out_q.put(("byte", time.monotonic()))
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(service, "127.0.0.1", SERVICE_PORT)
        session = CoordinatedEngine(CoordinatedSpec("server", SERVICE_PORT, Endpoint(*RDV),
                                                    punch_timeout=8))
        session.subscribe(lambda e: code_q.put(e.message) if e.kind == "code" else None)
        task = asyncio.create_task(session.run(), name="sharer")
        await asyncio.get_running_loop().run_in_executor(None, stop.wait, timeout)
        session.stop()
        with contextlib.suppress(NopfError):
            await task
        server.close()
        out_q.put(("sharer", _phases(session)))

    asyncio.run(main())


def _joiner_main(code: str, out_q: Queue[tuple[str, object]], timeout: float) -> None:
    async def main() -> None:
        session = CoordinatedEngine(CoordinatedSpec("client", CONNECTOR_PORT, Endpoint(*RDV),
                                                    code=code, punch_timeout=8))
        task = asyncio.create_task(session.run(), name="connector")
        loop = asyncio.get_running_loop()
        error = ""
        try:
            async with asyncio.timeout(timeout):
                while True:  # the listener opens as the session starts
                    sock = socket.socket()
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, ("127.0.0.1", CONNECTOR_PORT))
                        break
                    except OSError:
                        sock.close()
                        await asyncio.sleep(0.001)
                await loop.sock_sendall(sock, b"x")
                echoed = await loop.sock_recv(sock, 1)
                sock.close()
                if echoed != b"x":
                    error = f"echo returned {echoed!r}"
        except TimeoutError:
            error = f"no echo within {timeout} s (session state {session.state})"
        finally:
            session.stop()
            with contextlib.suppress(NopfError):
                await task
        out_q.put(("joiner", _phases(session)))
        out_q.put(("error", error))

    asyncio.run(main())


def _in_host(host: Host, target: Callable[..., None], *args: object) -> BaseProcess:
    """One peer per process (as on two machines: no shared GIL for the SPAKE2 maths)."""
    def body() -> None:
        with host.enter():
            target(*args)

    proc = _CTX.Process(target=body, daemon=True)
    proc.start()
    return proc


def one_run(sharer: Host, joiner: Host, timeout: float = 20) -> Run:
    code_q: Queue[str] = _CTX.Queue()
    out_q: Queue[tuple[str, object]] = _CTX.Queue()
    stop = _CTX.Event()
    a = _in_host(sharer, _sharer_main, code_q, out_q, stop, timeout)
    b: BaseProcess | None = None
    try:
        try:
            code = code_q.get(timeout=10)
        except queue.Empty:
            raise RuntimeError("no code from the sharer within 10 s") from None
        ready = time.monotonic()
        b = _in_host(joiner, _joiner_main, code, out_q, timeout)
        b.join(timeout + 5)
        stop.set()
        a.join(timeout + 5)
        got: dict[str, object] = {}
        with contextlib.suppress(queue.Empty):
            while len(got) < 4:
                kind, value = out_q.get(timeout=2)
                got[kind] = value
    finally:
        stop.set()
        for p in (a, b):
            if p is not None and p.is_alive():
                p.kill()
                p.join(5)
    if got.get("error") or "byte" not in got:
        raise RuntimeError(str(got.get("error") or "the byte never reached the service"))
    joined, shared, byte = got["joiner"], got.get("sharer", {}), got["byte"]
    assert isinstance(joined, dict) and isinstance(shared, dict) and isinstance(byte, float)
    return Run(ready, joined, shared, byte)


TFO_SYSCTL = {"off": "0x1", "on": "0x203"}  # on: server side, data without a cookie


def measure(delay_ms: float, runs: int, jitter_ms: float = 0,
            tfo: str = "off") -> tuple[float, dict[str, list[Run]]]:
    """``runs`` runs per Fast Open setting (``both``: off and on, alternating)."""
    modes = ["off", "on"] if tfo == "both" else [tfo]
    with Lab("rst", "drop", delay_ms=delay_ms, jitter_ms=jitter_ms) as lab:
        start_rendezvous(lab)
        rtt = handshake_rtt(lab.a1, RDV)
        results: dict[str, list[Run]] = {m: [] for m in modes}
        for i in range(runs):
            # ABAB then BABA...: neither setting always runs first after a pause.
            order = modes if i % 2 == 0 else modes[::-1]
            for mode in order:
                lab.rdv.run(["sysctl", "-qw", f"net.ipv4.tcp_fastopen={TFO_SYSCTL[mode]}"])
                results[mode].append(one_run(lab.a1, lab.b1))
                time.sleep(0.3)
        return rtt, results


def report(rtt: float, results: list[Run], target: float | None = None) -> str:
    lines = [f"RTT {rtt * 1000:.0f} ms, {len(results)} runs; median ms from ready (in RTTs):"]
    for phase in PHASES:
        values = [r.offsets()[phase] for r in results if phase in r.offsets()]
        if values:
            med = statistics.median(values)
            lines.append(f"  {phase:14s} {med * 1000:7.0f} ms  {med / rtt:5.2f} RTT")
    if target is not None:
        within = sum(r.offsets()["byte"] <= target for r in results)
        lines.append(f"  within 3 RTTs + 100 ms ({target * 1000:.0f} ms): "
                     f"{within}/{len(results)} runs")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, action="append")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tfo", choices=["off", "on", "both"], default="off",
                        help="TCP Fast Open on the rendezvous host (default off)")
    parser.add_argument("--json", type=Path, help="append each run's offsets (s) here")
    args = parser.parse_args()
    for delay in args.delay_ms or [20.0]:
        rtt, by_mode = measure(delay, args.runs, tfo=args.tfo)
        target = 3 * rtt + 0.1
        for mode, results in by_mode.items():
            print(f"delay {delay:g} ms per pass, Fast Open {mode} on the rendezvous: "
                  + report(rtt, results, target), flush=True)
        if len(by_mode) == 2:
            off, on = (statistics.median(r.offsets()["byte"] for r in by_mode[m])
                       for m in ("off", "on"))
            print(f"  byte median on/off: {on / off:.3f} ({(off - on) * 1000:.0f} ms less, "
                  f"{(off - on) / rtt:.2f} RTT)", flush=True)
        if args.json is not None:
            with args.json.open("a") as f:
                for mode, results in by_mode.items():
                    for r in results:
                        f.write(json.dumps({"delay_ms": delay, "rtt": rtt, "tfo": mode,
                                            **r.offsets()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
