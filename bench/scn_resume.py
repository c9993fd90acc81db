"""Tunnels across path changes: the relayed tunnel against the punched one, the time to
resume after a NAT rebind, and the time to move from the relay back to a direct path.

Three parts, each in its own namespace lab with the real ``nopf-server`` on rdv:

- **relayed vs punched**: two labs alike but for site a's NAT, one punchable
  (drop x drop: the tunnel is punched) and one symmetric (symmetric x drop: the
  ladder relays at once); real ``nopf share`` in a1 and ``nopf connect`` in b1 in
  each, one stream from b1 through the tunnel to a counting service in a1,
  alternating between the labs (medians). The relay's cost is the ``nopf-server``
  process's CPU time during the relayed transfers, per GB.
- **resume after a NAT rebind**: coordinated engines in-process (a thread in a1
  and one in b1, one clock), a stream carrying data all the time; each round
  rebinds site a's NAT (:meth:`tests.lab.Lab.rebind`: mappings gone, new public
  ports) and reads, per side, when the engine said the path was lost (detection)
  and when it said it resumed.
- **back to direct**: in-process engines paired while the direct path is cut
  (:meth:`tests.lab.Lab.block_direct`: relayed), the path opened again at a set
  moment; the time until both engines run over the direct path, and the time the
  successful meeting took (from its start: ``meet_again`` is wrapped to note when
  each meeting starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nopf_web.sessions.coordinated as coordinated
from bench.paths import ROOT, cpu_seconds, send_sized, stop_proc, wait_text
from bench.report import Progress, ScenarioResult, Target, bar_chart
from bench.scn_util import fmt, median, table
from nopf_web.errors import NopfError
from nopf_web.sessions.coordinated import CoordinatedEngine, CoordinatedSpec
from nopf_web.sessions.engine import Event
from nopf_web.wire.address import Endpoint
from tests.e2e.peers import RDV, Peer, start_coordinated, start_rendezvous
from tests.lab import Host, Lab

NAME = "resume"
TITLE = ("Resume and upgrade: the relayed tunnel vs the punched one, time to resume after "
         "a NAT rebind, time back to direct")
BUDGET_S = 180

SERVICE_PORT = 3000  # bench.paths' sink on a1's loopback
TUNNEL_PORT = 3010
DELAY_MS = 10.0  # parts 2 and 3: RTT about 2 x this between the sites
RATIO_GOAL = 0.5
# Part 3: when the direct path opens again, after the tunnel went onto the relay:
# before the first try (5 s), during it (its punch runs 5 s), between two tries.
UNBLOCK_AFTER = (2.0, 7.0, 12.0)


# -- helpers ---------------------------------------------------------------------------


def _sink(lab: Lab) -> subprocess.Popen[bytes]:
    proc = lab.a1.popen([sys.executable, "-m", "bench.paths", "sink"], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("the counting service in a1 did not start")
    return proc


@contextlib.contextmanager
def _lab(left: str, right: str, delay_ms: float = 0.0
         ) -> Iterator[tuple[Lab, subprocess.Popen[bytes]]]:
    with Lab(left, right, delay_ms=delay_ms) as lab:
        _sink(lab)
        server = start_rendezvous(lab)
        threading.Thread(target=_drain, args=(server,), daemon=True).start()
        yield lab, server


def _drain(proc: subprocess.Popen[bytes]) -> None:
    if proc.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            proc.stderr.read()


# -- part 1: the relayed tunnel against the punched one ---------------------------------


class _Processes:
    """``nopf share`` in a1 and ``nopf connect`` in b1 of one lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.peers: list[Peer] = []

    def _start(self, host: Host, *args: str) -> Peer:
        peer = start_coordinated(host, *args, timeout=15, keepalive=None)
        self.peers.append(peer)
        return peer

    def start(self) -> str:
        """Pair; the path's words from the connector's stderr."""
        sharer = self._start(self.lab.a1, "share", "-p", str(SERVICE_PORT))
        code = sharer.line(15)
        joiner = self._start(self.lab.b1, "connect", code, "-p", str(TUNNEL_PORT))
        for peer in (joiner, sharer):
            wait_text(peer.stderr, "encrypted tunnel to", 30, f"nopf {peer.role}", peer.proc)
        return "relay" if "over the relay" in joiner.stderr() else "public"

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.peers if p.proc.poll() is None]

    def stop(self) -> None:
        for peer in self.peers:
            stop_proc(peer.proc)


def _transfer(lab: Lab, size: int) -> float:
    with lab.b1.enter():
        sock = socket.create_connection(("127.0.0.1", TUNNEL_PORT), timeout=60)
    try:
        return send_sized(sock, size)
    finally:
        sock.close()


def _throughput(progress: Progress, quick: bool) -> dict[str, Any]:
    size = 48_000_000 if quick else 400_000_000
    rounds = 1 if quick else 5
    mb_s: dict[str, list[float]] = {"punched": [], "relayed": []}
    relay_cpu: list[float] = []
    ends_cpu: dict[str, list[float]] = {"punched": [], "relayed": []}
    with _lab("drop", "drop") as (punched_lab, _), \
            _lab("symmetric", "drop") as (relayed_lab, relay_server):
        tunnels = {"punched": _Processes(punched_lab), "relayed": _Processes(relayed_lab)}
        try:
            paths = {name: t.start() for name, t in tunnels.items()}
            if paths != {"punched": "public", "relayed": "relay"}:
                raise RuntimeError(f"unexpected paths: {paths}")
            labs = {"punched": punched_lab, "relayed": relayed_lab}
            for name in labs:
                _transfer(labs[name], min(size, 32_000_000))  # warm-up, not counted
            for r in range(rounds):
                for name in (("punched", "relayed") if r % 2 == 0 else ("relayed", "punched")):
                    pids = tunnels[name].pids()
                    before = cpu_seconds(pids)
                    relay_before = cpu_seconds([relay_server.pid])
                    mbs = _transfer(labs[name], size)
                    ends_cpu[name].append(round((cpu_seconds(pids) - before) / (size / 1e9), 3))
                    if name == "relayed":
                        relay_cpu.append(round((cpu_seconds([relay_server.pid])
                                                - relay_before) / (size / 1e9), 3))
                    mb_s[name].append(round(mbs, 1))
                    progress(f"throughput round {r + 1}/{rounds}: {name} {mbs:.0f} MB/s")
        finally:
            for t in tunnels.values():
                t.stop()
    med = {n: statistics.median(v) for n, v in mb_s.items()}
    return {"size_mb": size // 1_000_000, "rounds": rounds, "mb_s": mb_s,
            "median_mb_s": {n: round(v, 1) for n, v in med.items()},
            "ratio": round(med["relayed"] / med["punched"], 3),
            "relay_cpu_s_per_gb": relay_cpu,
            "median_relay_cpu_s_per_gb": statistics.median(relay_cpu),
            "ends_cpu_s_per_gb": ends_cpu,
            "median_ends_cpu_s_per_gb": {n: statistics.median(v) for n, v in ends_cpu.items()}}


# -- parts 2 and 3: engines in-process ---------------------------------------------------


class _Engines:
    """A sharer engine in a1 and a connector engine in b1, each in its own thread and
    loop; every event noted with ``time.monotonic()`` (one clock for both)."""

    def __init__(self, lab: Lab, **spec: Any) -> None:
        self.lab = lab
        self.spec = spec
        self.events: dict[str, list[tuple[float, Event]]] = {"server": [], "client": []}
        self.engines: dict[str, CoordinatedEngine] = {}
        self.loops: dict[str, asyncio.AbstractEventLoop] = {}
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self._codes: queue.Queue[str] = queue.Queue()

    def start(self) -> None:
        self._spawn(self.lab.a1, CoordinatedSpec("server", SERVICE_PORT, Endpoint(*_rdv()),
                                                 **self.spec))
        code = self._codes.get(timeout=15)
        self._spawn(self.lab.b1, CoordinatedSpec("client", TUNNEL_PORT, Endpoint(*_rdv()),
                                                 code=code, **self.spec))
        self.wait(lambda: all(e.state.value == "connected" for e in self.engines.values())
                  and len(self.engines) == 2, 30, "both engines connected")

    def _spawn(self, host: Host, spec: CoordinatedSpec) -> None:
        def main() -> None:
            with host.enter():
                asyncio.run(self._run(spec))

        t = threading.Thread(target=main, name=f"bench-{spec.role}", daemon=True)
        self.threads.append(t)
        t.start()

    async def _run(self, spec: CoordinatedSpec) -> None:
        engine = CoordinatedEngine(spec)
        role = spec.role
        self.loops[role] = asyncio.get_running_loop()
        self.engines[role] = engine

        def heard(event: Event) -> None:
            self.events[role].append((time.monotonic(), event))
            if event.kind == "code":
                self._codes.put(event.message)

        engine.subscribe(heard)
        try:
            await engine.run()
        except NopfError as exc:
            self.errors.append(f"{role}: {exc}")

    def connected_at(self, role: str) -> float:
        """When ``role``'s engine said its tunnel was up."""
        for t, e in list(self.events[role]):
            if e.kind == "state" and e.data.get("state") == "connected":
                return t
        raise RuntimeError(f"the {role} engine never connected")

    def news(self, role: str, news: str, after: float) -> float | None:
        """When ``role``'s engine first said ``news`` (a path event) at or after ``after``."""
        for t, e in list(self.events[role]):
            if t >= after and e.kind == "path" and e.data.get("news") == news:
                return t
        return None

    def all_said(self, news: str, after: float) -> bool:
        return all(self.news(role, news, after) is not None for role in ("server", "client"))

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:g} s; errors {self.errors}; "
                                   f"events {[e.message for _, e in self.events['client']][-5:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        for role, engine in self.engines.items():
            loop = self.loops[role]
            with contextlib.suppress(RuntimeError):  # its loop already ended
                loop.call_soon_threadsafe(engine.stop)
        for t in self.threads:
            t.join(15)


def _rdv() -> tuple[str, int]:
    host, port = RDV.split(":")
    return host, int(port)


class _Stream:
    """One connection from b1 through the tunnel to the counting service in a1, sending
    64 KiB every ``pace`` seconds until stopped (data always in flight)."""

    def __init__(self, lab: Lab, pace: float = 0.01) -> None:
        with lab.b1.enter():
            self.sock = socket.create_connection(("127.0.0.1", TUNNEL_PORT), timeout=60)
        self.sock.sendall(b"N" + (1 << 62).to_bytes(8, "big"))  # sized mode, ended by closing
        self.pace = pace
        self.sent = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = os.urandom(64 * 1024)
        try:
            while not self._stop.is_set():
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                time.sleep(self.pace)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sock.close()


def _resume(progress: Progress, quick: bool) -> dict[str, Any]:
    rounds = 2 if quick else 6
    out: list[dict[str, float]] = []
    with _lab("drop", "drop", DELAY_MS) as (lab, _):
        engines = _Engines(lab, keepalive=15.0)
        engines.start()
        stream = _Stream(lab)
        try:
            time.sleep(1.0)  # RTT samples
            for r in range(rounds):
                at = time.monotonic()
                lab.rebind("a")
                engines.wait(functools.partial(engines.all_said, "resumed", at), 30, "resume")
                row: dict[str, float] = {}
                for role, side in (("server", "sharer"), ("client", "connector")):
                    lost = engines.news(role, "lost", at)
                    resumed = engines.news(role, "resumed", at)
                    assert lost is not None and resumed is not None
                    row[f"{side}_detect_s"] = round(lost - at, 3)
                    row[f"{side}_resume_s"] = round(resumed - lost, 3)
                row["both_resumed_after_last_detection_s"] = round(
                    max(engines.news(r_, "resumed", at) or 0 for r_ in ("server", "client"))
                    - at - max(row["sharer_detect_s"], row["connector_detect_s"]), 3)
                out.append(row)
                progress(f"resume round {r + 1}/{rounds}: detected after "
                         f"{row['sharer_detect_s']:.2f}/{row['connector_detect_s']:.2f} s, "
                         f"resumed {row['sharer_resume_s']:.2f}/"
                         f"{row['connector_resume_s']:.2f} s later (sharer/connector)")
                time.sleep(1.0)  # fresh RTT samples on the new path
            if stream.error is not None:
                raise RuntimeError(f"the stream broke: {stream.error}")
        finally:
            stream.stop()
            engines.stop()
    rtt = 2 * DELAY_MS / 1000
    worst = [max(r["sharer_resume_s"], r["connector_resume_s"]) for r in out]
    return {"rounds": out, "rtt_s": rtt, "median_worst_side_resume_s": statistics.median(worst),
            "max_worst_side_resume_s": max(worst),
            "median_detect_s": statistics.median(
                [r[f"{s}_detect_s"] for r in out for s in ("sharer", "connector")])}


class _Meetings:
    """``meet_again`` as the engines call it, noting when each meeting starts."""

    def __init__(self) -> None:
        self.started: list[tuple[float, bool, str]] = []  # (monotonic, direct_only, side)
        # The engine's module calls it by this name (the module's own global).
        self._original: Callable[..., Any] = vars(coordinated)["meet_again"]

    def __enter__(self) -> _Meetings:
        original = self._original

        @functools.wraps(original)
        async def noted(*args: Any, **kwargs: Any) -> Any:
            self.started.append((time.monotonic(), bool(kwargs.get("direct_only")),
                                 threading.current_thread().name))
            return await original(*args, **kwargs)

        vars(coordinated)["meet_again"] = noted
        return self

    def __exit__(self, *exc: object) -> None:
        vars(coordinated)["meet_again"] = self._original


def _upgrade(progress: Progress, quick: bool) -> dict[str, Any]:
    offsets = (0.5,) if quick else UNBLOCK_AFTER
    retry = 1.0 if quick else 5.0
    out: list[dict[str, float]] = []
    with _lab("drop", "drop", DELAY_MS) as (lab, _), _Meetings() as meetings:
        for k, offset in enumerate(offsets):
            lab.block_direct()
            engines = _Engines(lab, retry_direct=retry)
            try:
                engines.start()
                if {e.path for e in engines.engines.values()} != {"relay"}:
                    raise RuntimeError("the tunnel did not go through the relay")
                relayed_at = max(engines.connected_at(r) for r in ("server", "client"))
                time.sleep(max(0.0, relayed_at + offset - time.monotonic()))
                opened = time.monotonic()
                lab.unblock_direct()
                engines.wait(functools.partial(engines.all_said, "upgraded", opened), 60,
                             "upgrade")
                done = max(engines.news(r, "upgraded", opened) or 0.0
                           for r in ("server", "client"))
                # The meeting that got through: the last upgrade one started before the end.
                starts = [t for t, direct, _ in meetings.started if direct and t <= done]
                tries = [t for t, direct, side in meetings.started
                         if direct and side == "bench-server" and relayed_at <= t <= done]
                row = {"opened_after_relay_s": round(opened - relayed_at, 2),
                       "to_direct_s": round(done - opened, 3),
                       "meeting_s": round(done - max(starts), 3) if starts else float("nan"),
                       "tries": len(tries)}
                out.append(row)
                progress(f"upgrade round {k + 1}/{len(offsets)}: direct path opened "
                         f"{row['opened_after_relay_s']:.1f} s after the relay, tunnel on it "
                         f"{row['to_direct_s']:.2f} s later (the meeting "
                         f"{row['meeting_s']:.2f} s)")
            finally:
                engines.stop()
    return {"rounds": out, "retry_direct_s": retry,
            "median_meeting_s": median([r["meeting_s"] for r in out]),
            "max_to_direct_s": max(r["to_direct_s"] for r in out)}


# -- the scenario ----------------------------------------------------------------------


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    data: dict[str, Any] = {"delay_ms": DELAY_MS}
    progress("relayed vs punched tunnel")
    data["throughput"] = _throughput(progress, quick)
    progress("resume after a NAT rebind")
    data["resume"] = _resume(progress, quick)
    progress("from the relay back to a direct path")
    data["upgrade"] = _upgrade(progress, quick)
    return ScenarioResult(NAME, TITLE, data, _markdown(data), _plots(data, outdir),
                          _targets(data))


def _targets(data: dict[str, Any]) -> list[Target]:
    tp, rs, up = data["throughput"], data["resume"], data["upgrade"]
    goal = 2.0 + rs["rtt_s"]
    return [
        Target("relayed tunnel throughput vs the punched one", f">= {RATIO_GOAL} (issue 12)",
               f"{tp['ratio']:.2f} ({tp['median_mb_s']['relayed']:.0f} vs "
               f"{tp['median_mb_s']['punched']:.0f} MB/s)", tp["ratio"] >= RATIO_GOAL),
        Target("time to resume after a NAT rebind, from detection",
               f"<= 2 s + 1 RTT = {goal:.2f} s (issue 12)",
               f"median {rs['median_worst_side_resume_s']:.2f} s, max "
               f"{rs['max_worst_side_resume_s']:.2f} s (the slower side; detection "
               f"{rs['median_detect_s']:.2f} s)", rs["max_worst_side_resume_s"] <= goal),
        Target("relay -> direct once the direct path is open",
               "at the next try (5, 10, 20, 30, 30... s apart; issue 12)",
               f"the meeting {fmt(up['median_meeting_s'], '.2f')} s (median); at most "
               f"{up['max_to_direct_s']:.1f} s after the path opened",
               up["max_to_direct_s"] <= 30.0 + 10.0),
    ]


def _markdown(data: dict[str, Any]) -> str:
    tp, rs, up = data["throughput"], data["resume"], data["upgrade"]
    md = [
        "**The relayed tunnel against the punched one.** Two labs without delay, alike but "
        "for site a's NAT: drop x drop (punched) and symmetric x drop (the ladder relays at "
        "once). Real `nopf share` (a1) and `nopf connect` (b1); one stream of "
        f"{tp['size_mb']} MB from b1 to a counting service in a1, {tp['rounds']} rounds "
        "alternating the labs (median). The relay copies bytes with splice: its CPU is "
        "the `nopf-server` process's during the relayed transfers, per GB (the relay's "
        "own target is measured by the `relay` scenario, raw bytes over 1 GB; here it "
        "also pays for the rendezvous' answers to the tunnel's tries of a direct path, "
        "refused at once for a symmetric NAT); the tunnel ends' CPU is both `nopf` "
        "processes'. Everything shares the 2 cores, so the ratio is a floor on this "
        "machine.", "",
        table(["tunnel", "MB/s (median)", "ratio", "tunnel ends CPU-s/GB",
               "relay CPU-s/GB", "runs (MB/s)"], [
            ["punched", f"{tp['median_mb_s']['punched']:.0f}", "1.00",
             f"{tp['median_ends_cpu_s_per_gb']['punched']:.2f}", "-",
             ", ".join(f"{v:.0f}" for v in tp["mb_s"]["punched"])],
            ["relayed", f"{tp['median_mb_s']['relayed']:.0f}", f"{tp['ratio']:.2f}",
             f"{tp['median_ends_cpu_s_per_gb']['relayed']:.2f}",
             f"{tp['median_relay_cpu_s_per_gb']:.2f}",
             ", ".join(f"{v:.0f}" for v in tp["mb_s"]["relayed"])]]), "",
        f"**Resume after a NAT rebind.** drop x drop, {data['delay_ms']:g} ms per pass "
        f"through the internet router (RTT {rs['rtt_s'] * 1000:.0f} ms), coordinated "
        "engines in-process, a stream from b1 to a1 carrying 6.5 MB/s all the time. Each "
        "round flushes site a's NAT and moves it to new public ports (`Lab.rebind`). "
        "Detection: from the rebind to the engine's \"path was lost\"; resume: from "
        "there to its \"resumed\" (a meeting through the rendezvous: mapping check, "
        "hello, fire, punch, the path handshake, SELECT and the replay).", "",
        table(["round", "detected (sharer / connector)", "resumed after detection (sharer / "
               "connector)", "both resumed, from the later detection"],
              [[str(i + 1), f"{r['sharer_detect_s']:.2f} / {r['connector_detect_s']:.2f} s",
                f"{r['sharer_resume_s']:.2f} / {r['connector_resume_s']:.2f} s",
                f"{r['both_resumed_after_last_detection_s']:.2f} s"]
               for i, r in enumerate(rs["rounds"])]), "",
        "Detection is the resume layer's: an RST or a socket error is a loss at once; "
        "silence is, when data is outstanding, a probe after T = max(1 s, 4 × RTT) "
        "without a byte from the peer and the verdict T later (2 s on this path). Neither "
        "NAT here answers for a lost mapping, so both sides detect by silence, at about "
        "the same moment (an RST-answering NAT tells one side at once, which then waits "
        "at the rendezvous for the other).", "",
        "**From the relay back to direct.** drop x drop, RTT "
        f"{rs['rtt_s'] * 1000:.0f} ms; each round pairs new engines while the direct path "
        "between the sites is cut (`Lab.block_direct`: the punch fails, the relay "
        "carries the tunnel), then opens it again a set time after the tunnel went onto "
        f"the relay. Direct tries {up['retry_direct_s']:g} s after the relay, then doubling "
        "up to every 30 s; each punches for up to 5 s.", "",
        table(["direct path opened after the relay", "tunnel on it after", "its meeting",
               "tries"],
              [[f"{r['opened_after_relay_s']:.1f} s", f"{r['to_direct_s']:.2f} s",
                f"{fmt(r['meeting_s'], '.2f')} s", str(r["tries"])] for r in up["rounds"]]),
        "",
        "The time to direct is mostly the wait for the next try (the back-off); the "
        "meeting itself (mapping check, hello, fire, punch, path handshake, SELECT) takes "
        "a few round trips, or less than the rest of a punch already running when the "
        "path opens.",
    ]
    return "\n".join(md)


def _plots(data: dict[str, Any], outdir: Path) -> list[Path]:
    tp = data["throughput"]
    return [bar_chart(
        outdir / "relayed_vs_punched.png", "One stream through the tunnel, punched vs relayed",
        "MB/s (median)", ["punched", "relayed"],
        {"MB/s": [tp["median_mb_s"]["punched"], tp["median_mb_s"]["relayed"]]},
        {"MB/s": ["", f"{tp['ratio']:.2f}; relay {tp['median_relay_cpu_s_per_gb']:.2f} "
                  "CPU-s/GB"]})]


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
