"""How fast a resumable tunnel notices a broken path and carries data again, on loopback.

A mux over two ``ResumableChannel``s (default thresholds), one stream carrying
data continuously from the sharer to the connector. Every connection goes
through a small proxy that can kill it (an RST to both ends, ``SO_LINGER`` 0)
or turn it into a black hole (nothing crosses, both sockets stay up). Each
round breaks the current connection; as soon as a side asks for a path
(``NeedPath``), a new loopback connection is added on both sides (as the
rendezvous would arrange, minus the rendezvous and the punch). Measured per
round:

- detection: from the break to the first ``PathLost`` (an RST: at once; a
  black hole: by liveness, a probe after T of silence and the verdict T later,
  T = max(1 s, 4 x RTT));
- resume: from that ``PathLost`` to the first byte the application reads
  again (new connection, path handshake, SELECT, replay).

    .venv/bin/python -m bench.resume [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Literal

from bench.report import write_json
from nopf_web.tunnel.mux import Mux, Stream
from nopf_web.tunnel.resumable import ResumableChannel
from nopf_web.tunnel.resume_machine import NeedPath, PathLost, PathSelected, ResumeEvent
from tests.loopback import tcp_pair

CODE = "7-orbit-lantern"
_LINGER_RST = struct.pack("ii", 1, 0)
Break = Literal["reset", "blackhole"]


class Link:
    """One connection A <-> proxy <-> B that can be reset or frozen."""

    def __init__(self, tasks: asyncio.TaskGroup) -> None:
        self.a, self._pa = tcp_pair()
        self._pb, self.b = tcp_pair()
        self.frozen = False
        for s in (self._pa, self._pb):
            s.setblocking(False)
        self._tasks = [tasks.create_task(self._copy(self._pa, self._pb), name="link-a>b"),
                       tasks.create_task(self._copy(self._pb, self._pa), name="link-b>a")]

    async def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(src, 1 << 18):
                if self.frozen:
                    await asyncio.Future()  # a black hole: never forwards again
                await loop.sock_sendall(dst, data)

    async def close(self, *, rst: bool) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.wait(self._tasks)
        for s in (self._pa, self._pb):
            if rst:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            s.close()


class Side:
    def __init__(self, role: Literal["server", "client"], need: asyncio.Event) -> None:
        self.events: list[tuple[float, ResumeEvent]] = []
        self.need = need
        self.channel = ResumableChannel(role, code=CODE, on_event=self.on_event, name=role)

    def on_event(self, event: ResumeEvent) -> None:
        self.events.append((time.monotonic(), event))
        if isinstance(event, NeedPath):
            self.need.set()

    def first(self, kind: type, after: float) -> float | None:
        return next((t for t, e in self.events if isinstance(e, kind) and t >= after), None)


class Reader:
    """Reads the stream as fast as it comes; remembers when bytes arrived."""

    def __init__(self) -> None:
        self.last = 0.0
        self.arrived = asyncio.Event()

    async def run(self, stream: Stream) -> None:
        while await stream.read(1 << 20):
            self.last = time.monotonic()
            self.arrived.set()


async def writer(stream: Stream) -> None:
    chunk = bytes(64 * 1024)
    while True:
        await stream.write(chunk)


async def connect(tasks: asyncio.TaskGroup, a: Side, b: Side, *, first: bool = False) -> Link:
    link = Link(tasks)
    async with asyncio.timeout(15):
        await asyncio.gather(a.channel.add_path(link.a, "public", first=first),
                             b.channel.add_path(link.b, "public", first=first))
    return link


async def rounds(count: int, how: Break) -> list[dict[str, float]]:
    results: list[dict[str, float]] = []
    async with asyncio.TaskGroup() as tasks:
        need = asyncio.Event()
        a, b = Side("server", need), Side("client", need)
        links = [await connect(tasks, a, b, first=True)]
        async with Mux(a.channel, role="server", dead_after=120.0) as ma, \
                Mux(b.channel, role="client", dead_after=120.0) as mb:
            out = await ma.open_stream()
            reader = Reader()
            flow = [tasks.create_task(writer(out), name="writer"),
                    tasks.create_task(reader.run(await mb.accept_stream()), name="reader")]
            for _ in range(count):
                await asyncio.sleep(0.3)  # data flowing
                need.clear()
                broken_at = time.monotonic()
                if how == "reset":
                    await links[-1].close(rst=True)
                else:
                    links[-1].frozen = True
                async with asyncio.timeout(30):
                    await need.wait()
                links.append(await connect(tasks, a, b))
                up = time.monotonic()
                lost = min(t for t in (a.first(PathLost, broken_at), b.first(PathLost, broken_at))
                           if t is not None)
                async with asyncio.timeout(10):
                    while reader.last <= up:
                        reader.arrived.clear()
                        await reader.arrived.wait()
                selected = b.first(PathSelected, broken_at) or up
                silent = [e.silent_for for s in (a, b) for t, e in s.events
                          if isinstance(e, PathLost) and t >= broken_at]
                results.append({"detect_s": lost - broken_at, "connect_s": up - lost,
                                "select_s": selected - lost, "resume_s": reader.last - lost,
                                "silent_for_s": max(silent)})
                if how == "blackhole":
                    await links[-2].close(rst=False)
            for t in flow:
                t.cancel()
        for link in links:
            await link.close(rst=False)
    return results


def summary(results: list[dict[str, float]], key: str) -> str:
    values = [r[key] * 1000 for r in results]
    return f"median {statistics.median(values):.1f} ms ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--blackhole-rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report: dict[str, list[dict[str, float]]] = {}
    for how, count in (("reset", args.rounds), ("blackhole", args.blackhole_rounds)):
        print(f"{count} rounds: {how}", file=sys.stderr, flush=True)
        report[how] = asyncio.run(rounds(count, how))  # type: ignore[arg-type]
    for how, results in report.items():
        print(f"{how}: detection {summary(results, 'detect_s')}; from detection: new "
              f"connection up {summary(results, 'connect_s')}, data again "
              f"{summary(results, 'resume_s')}")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
