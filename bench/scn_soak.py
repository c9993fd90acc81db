"""Soak: a share/connect tunnel and a dashboard session under connection churn for
an hour (configurable), every byte checked, memory and open files sampled.

On loopback (no lab, no root), the real programs: ``nopf-server``; ``nopf
share`` and ``nopf connect`` (the CLI tunnel); two ``nopf-web`` dashboards, A
(with its embedded rendezvous) holding a coordinated server session and B the
client session that joined with its code (the dashboard tunnel), both polled
the way an open browser tab does. One echo service, a process of its own,
sits behind both sharers.

Churn, through both tunnels at once, ``--concurrency`` connections each: most
echo a random number of bytes (log-uniform, 0 to ``--max-kb``) and compare
every byte that comes back; some send a little, wait for its echo, stay idle
for up to ``--idle-max`` seconds (minutes in the full run), then finish and
are checked the same way; some are aborted mid-stream (an RST from the
client after part of their bytes). Every few seconds the resident memory
and open files of each program are sampled.

Targets: 0 errors (a checked connection that failed, was reset, cut short or
timed out; a dashboard request that failed; a tunnel that left
``connected``); no growth after warm-up (each program's memory in the last
quarter of the run within 10 % + 8 MiB of the first quarter after warm-up);
the open files of each program back to where they were before the churn
once the connections are gone.

    .venv/bin/python -m bench.scn_soak [--duration 3600] [--concurrency 48]
        [--idle-max 240] [--max-kb 2048] [--json out.json] [--outdir docs/img]

In the suite (``python -m bench.suite --only soak``) it runs
``$NOPF_SOAK_SECONDS`` (default 3600) or, with ``--quick``, 120 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.report import Progress, ScenarioResult, Target
from bench.scn_streams import ECHO
from bench.scn_util import fmt, label_plot, new_figure, raise_nofile, save_figure, table
from tests.programs import argv, free_port

NAME = "soak"
TITLE = "Soak: a tunnel and a dashboard session under connection churn"
BUDGET_S = 3900

PATTERN = random.Random(15).randbytes(1 << 22)  # what connections send: slices of this
CHUNK = 1 << 16
_LINGER_RST = struct.pack("ii", 1, 0)
START_TIMEOUT = 30.0  # s for the programs to start and the tunnels to connect


@dataclass
class Config:
    duration: float = 3600.0  # s of churn
    warmup: float = 300.0  # s before memory is compared
    concurrency: int = 48  # connections open at once through each tunnel
    idle_max: float = 240.0  # s an idle connection may stay quiet
    max_kb: int = 2048  # largest echo
    sample_every: float = 10.0  # s between memory/open-file samples
    poll_every: float = 1.0  # s between dashboard polls (a browser tab's pace)
    seed: int = 15

    @classmethod
    def quick(cls, duration: float = 120.0) -> Config:
        return cls(duration=duration, warmup=duration / 4, concurrency=32,
                   idle_max=min(20.0, duration / 6), max_kb=1024, sample_every=2.0)


@dataclass
class Counts:
    done: int = 0
    bulk: int = 0
    idle: int = 0
    aborted: int = 0
    bytes_checked: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    polls: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(text[:300])


# -- the programs -------------------------------------------------------------------------


class Program:
    """One process, its stderr in a file (read on failure)."""

    def __init__(self, name: str, args: list[str], tmp: Path) -> None:
        self.name = name
        self._err: IO[bytes] = open(tmp / f"{name}.stderr", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err)

    def line(self, timeout: float = START_TIMEOUT) -> str:
        """The next stdout line (the programs print one: a URL, a code, a port)."""
        assert self.proc.stdout is not None
        out: list[bytes] = []
        reader = _thread(lambda: out.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.join(timeout)
        if not out or not out[0]:
            raise RuntimeError(f"{self.name} printed nothing within {timeout:g} s: "
                               f"{self.stderr()[-500:]}")
        return out[0].decode().strip()

    def stderr(self) -> str:
        self._err.flush()
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def sample(self) -> tuple[int, int]:
        """(resident memory in bytes, open files) now."""
        pid = self.proc.pid
        rss = 0
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))

    def stop(self, *, signalled: bool = False) -> int | None:
        """SIGTERM (once: a second one may land after the program's handler is
        gone, mid-shutdown), then wait for the exit."""
        if self.proc.poll() is None:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode


def _thread(fn: Callable[[], None]) -> Any:
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


class Dashboard:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.url = program.line().rstrip("/")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bytes(resp.read())

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return json.loads(self.call(method, path, body))

    def wait(self, sid: str, what: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            data: dict[str, Any] = self.json("GET", f"/api/sessions/{sid}")
            if ok(data):
                return data
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.program.name}: no {what} within "
                                   f"{START_TIMEOUT:g} s: {data}")
            time.sleep(0.1)


@dataclass
class Setup:
    programs: list[Program]
    cli_port: int  # nopf connect's local port
    web_port: int  # the dashboard client session's local port
    dashboards: list[tuple[Dashboard, str]]  # (dashboard, its session id)


@contextlib.contextmanager
def programs(tmp: Path) -> Iterator[Setup]:
    started: list[Program] = []

    def start(name: str, args: list[str]) -> Program:
        p = Program(name, args, tmp)
        started.append(p)
        return p

    try:
        echo = start("echo", [sys.executable, "-c", ECHO, "127.0.0.1", "0"])
        service = int(echo.line())
        rdv_port = free_port()
        rdv = start("nopf-server", argv("nopf-server", "--host", "127.0.0.1", "--port",
                                        str(rdv_port)))
        _wait_listening(rdv_port, rdv)
        rdv_addr = f"127.0.0.1:{rdv_port}"
        share = start("nopf share", argv("nopf", "share", "-p", str(service), "-a", rdv_addr))
        code = share.line()
        cli_port = free_port()
        connect = start("nopf connect", argv("nopf", "connect", code, "-p", str(cli_port),
                                             "-a", rdv_addr))
        web_rdv = free_port()
        a = Dashboard(start("nopf-web A", argv(
            "nopf-web", "--port", "0", "--db", str(tmp / "a.sqlite3"), "--no-guard",
            "--no-browser", "--rendezvous-listen", f"127.0.0.1:{web_rdv}")))
        b = Dashboard(start("nopf-web B", argv(
            "nopf-web", "--port", "0", "--db", str(tmp / "b.sqlite3"), "--no-guard",
            "--no-browser", "--rendezvous", f"127.0.0.1:{web_rdv}")))
        server = a.json("POST", "/api/sessions", {"role": "server", "local_port": service})
        server = a.wait(server["id"], "pairing code", lambda d: bool(d["code"]))
        web_port = free_port()
        client = b.json("POST", "/api/sessions", {"role": "client", "local_port": web_port,
                                                "code": server["code"]})
        for d, sid in ((a, server["id"]), (b, client["id"])):
            d.wait(sid, "connected", lambda s: s["state"] == "connected")
        for p in (share, connect):
            deadline = time.monotonic() + START_TIMEOUT
            while "encrypted tunnel to" not in p.stderr():
                if p.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{p.name}: no tunnel: {p.stderr()[-500:]}")
                time.sleep(0.05)
        yield Setup(started, cli_port, web_port, [(a, server["id"]), (b, client["id"])])
    finally:
        # All at once: a program stopped after its peer may already be exiting
        # on its own (the tunnel closed), past its signal handler.
        for p in started:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in reversed(started):
            p.stop(signalled=True)


def _wait_listening(port: int, program: Program) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if program.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{program.name} did not listen: {program.stderr()[-500:]}")
        time.sleep(0.05)


# -- the churn ----------------------------------------------------------------------------


async def _read_exact_echo(reader: asyncio.StreamReader, want: memoryview, what: str) -> None:
    got = 0
    while got < len(want):
        data = await reader.read(min(CHUNK * 4, len(want) - got))
        if not data:
            raise ConnectionError(f"{what}: the echo ended after {got} of {len(want)} bytes")
        if data != want[got : got + len(data)]:
            raise ValueError(f"{what}: bytes {got}..{got + len(data)} differ")
        got += len(data)


async def echo_once(port: int, size: int, offset: int, what: str, counts: Counts,
                    idle: float = 0.0) -> None:
    """One checked connection: ``size`` bytes of the pattern, echoed back intact, then
    EOF both ways; with ``idle``, a first KiB, its echo, then ``idle`` s of silence."""
    data = memoryview(PATTERN)[offset : offset + size]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        head = 0
        if idle:
            head = min(1024, size)
            writer.write(data[:head])
            await _read_exact_echo(reader, data[:head], what)
            await asyncio.sleep(idle)

        async def send() -> None:
            for off in range(head, size, CHUNK):
                writer.write(data[off : off + CHUNK])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send(), name=f"soak-send-{what}")
        try:
            await _read_exact_echo(reader, data[head:], what)
            if await reader.read(1):
                raise ValueError(f"{what}: more bytes than were sent")
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
        counts.bytes_checked += size
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def abort_midway(port: int, size: int, offset: int) -> None:
    """Send part of ``size`` bytes, read a little of the echo, then an RST."""
    data = memoryview(PATTERN)[offset : offset + size]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data[: size // 2])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await reader.read(size // 4 or 1)
    finally:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        writer.transport.abort()


async def churn(port: int, label: str, cfg: Config, counts: Counts, stop: asyncio.Event,
                rng: random.Random) -> None:
    """``cfg.concurrency`` connections at a time through ``port`` until ``stop``."""
    slots = asyncio.Semaphore(cfg.concurrency)
    idle_slots = max(1, cfg.concurrency // 8)  # at most this many idle at once
    idle_now = 0
    n = 0

    async def one(i: int, kind: str, size: int, offset: int, idle: float) -> None:
        nonlocal idle_now
        what = f"{label} #{i} ({kind}, {size} B)"
        try:
            async with asyncio.timeout(idle + 120):
                if kind == "abort":
                    await abort_midway(port, size, offset)
                else:
                    await echo_once(port, size, offset, what, counts, idle)
            counts.done += 1
            setattr(counts, "aborted" if kind == "abort" else kind,
                    getattr(counts, "aborted" if kind == "abort" else kind) + 1)
        except TimeoutError:
            counts.error(f"{what}: not done within {idle + 120:g} s")
        except (OSError, ValueError) as exc:
            counts.error(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            if kind == "idle":
                idle_now -= 1
            slots.release()

    async with asyncio.TaskGroup() as tasks:
        while not stop.is_set():
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            n += 1
            pick = rng.random()
            kind = "idle" if pick < 0.08 and idle_now < idle_slots else \
                "abort" if pick < 0.2 else "bulk"
            if kind == "idle":
                idle_now += 1
            size = int(2 ** rng.uniform(0, 10 + (cfg.max_kb.bit_length() - 1))) - 1
            size = min(size, cfg.max_kb * 1024)
            offset = rng.randrange(len(PATTERN) - size + 1)
            idle = rng.uniform(1, cfg.idle_max) if kind == "idle" else 0.0
            tasks.create_task(one(n, kind, size, offset, idle), name=f"soak-{label}-{n}")


def poll_dashboards(setup: Setup, counts: Counts) -> None:
    """One sweep, as open tabs do: the live fragment, the JSON session, the list;
    the sessions must still be connected."""
    for d, sid in setup.dashboards:
        try:
            d.call("GET", f"/sessions/{sid}", headers={"HX-Request": "true"})
            state = d.json("GET", f"/api/sessions/{sid}")["state"]
            d.call("GET", "/", headers={"HX-Request": "true"})
            counts.polls += 1
            if state != "connected":
                counts.error(f"{d.program.name}: the session is {state}, not connected")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            counts.error(f"{d.program.name}: dashboard request failed: {exc}")


@dataclass
class Sample:
    t: float
    rss: dict[str, int]
    fds: dict[str, int]


def sample(setup: Setup, t: float) -> Sample:
    rss, fds = {}, {}
    for p in setup.programs:
        if p.name == "echo":
            continue
        rss[p.name], fds[p.name] = p.sample()
    return Sample(t, rss, fds)


async def run_churn(setup: Setup, cfg: Config, counts: Counts, progress: Progress
                    ) -> tuple[list[Sample], dict[str, int], dict[str, int]]:
    """The churn for ``cfg.duration`` s; samples, and the open files before and after."""
    loop = asyncio.get_running_loop()
    before = (await loop.run_in_executor(None, sample, setup, 0.0)).fds
    stop = asyncio.Event()
    rng = random.Random(cfg.seed)
    samples: list[Sample] = []
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tasks:
        for port, label in ((setup.cli_port, "cli"), (setup.web_port, "web")):
            tasks.create_task(churn(port, label, cfg, counts, stop,
                                    random.Random(rng.random())), name=f"churn-{label}")
        next_sample = next_poll = next_report = 0.0
        while (now := time.monotonic() - t0) < cfg.duration:
            if now >= next_poll:
                await loop.run_in_executor(None, poll_dashboards, setup, counts)
                next_poll = now + cfg.poll_every
            if now >= next_sample:
                samples.append(await loop.run_in_executor(None, sample, setup, now))
                next_sample = now + cfg.sample_every
            if now >= next_report:
                progress(f"{now:5.0f} s: {counts.done:,} connections ({counts.aborted:,} "
                         f"aborted, {counts.idle:,} idle), {counts.bytes_checked / 1e6:,.0f} MB "
                         f"checked, {counts.errors} errors")
                next_report = now + max(10.0, cfg.duration / 20)
            await asyncio.sleep(0.2)
        stop.set()
    # Every connection is gone: the programs' open files go back to where they were.
    after: dict[str, int] = {}
    deadline = time.monotonic() + 15
    while True:
        after = (await loop.run_in_executor(None, sample, setup, 0.0)).fds
        if all(after[n] <= before[n] for n in before) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await loop.run_in_executor(None, poll_dashboards, setup, counts)
    return samples, before, after


# -- the verdict ----------------------------------------------------------------------------


def growth(samples: list[Sample], warmup: float) -> dict[str, dict[str, float]]:
    """Per program: median memory in the first and last quarter after warm-up."""
    late = [s for s in samples if s.t >= warmup]
    quarter = max(1, len(late) // 4)
    out: dict[str, dict[str, float]] = {}
    for name in samples[0].rss if samples else ():
        first = statistics.median(s.rss[name] for s in late[:quarter])
        last = statistics.median(s.rss[name] for s in late[-quarter:])
        out[name] = {"first_mib": first / 2**20, "last_mib": last / 2**20,
                     "allowed_mib": (first * 1.10 + 8 * 2**20) / 2**20}
    return out


@dataclass
class Outcome:
    config: Config
    counts: Counts
    samples: list[Sample]
    fds_before: dict[str, int]
    fds_after: dict[str, int]
    memory: dict[str, dict[str, float]]
    exit_codes: dict[str, int | None]

    @property
    def grew(self) -> list[str]:
        return [n for n, m in self.memory.items() if m["last_mib"] > m["allowed_mib"]]

    @property
    def leaked_files(self) -> list[str]:
        return [n for n in self.fds_before if self.fds_after[n] > self.fds_before[n]]

    def data(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "counts": asdict(self.counts),
                "memory": self.memory, "fds_before": self.fds_before,
                "fds_after": self.fds_after, "grew": self.grew,
                "leaked_files": self.leaked_files, "exit_codes": self.exit_codes,
                "samples": [asdict(s) for s in self.samples]}


def soak(cfg: Config, progress: Progress) -> Outcome:
    raise_nofile(8192)
    counts = Counts()
    with tempfile.TemporaryDirectory(prefix="nopf-soak-") as tmp:
        with programs(Path(tmp)) as setup:
            progress(f"tunnels up; {cfg.duration:g} s of churn, {cfg.concurrency} "
                     f"connections at a time through each")
            samples, before, after = asyncio.run(run_churn(setup, cfg, counts, progress))
            for p in setup.programs:
                if p.proc.poll() is not None:
                    counts.error(f"{p.name} exited ({p.proc.returncode}): "
                                 f"{p.stderr()[-300:]}")
        codes = {p.name: p.proc.returncode for p in setup.programs}
    return Outcome(cfg, counts, samples, before, after, growth(samples, cfg.warmup), codes)


def result(outcome: Outcome, outdir: Path) -> ScenarioResult:
    cfg, c = outcome.config, outcome.counts
    rows = [[name, fmt(m["first_mib"], ".1f"), fmt(m["last_mib"], ".1f"),
             fmt(m["allowed_mib"], ".1f"), str(outcome.fds_before[name]),
             str(outcome.fds_after[name])] for name, m in outcome.memory.items()]
    md = [
        f"{cfg.duration / 60:g} minutes on loopback: `nopf share`/`nopf connect` and a "
        "dashboard session (two `nopf-web`, coordinated mode, polled each second like an "
        f"open tab) in front of one echo service, {cfg.concurrency} connections at a time "
        "through each tunnel: log-uniform sizes up to "
        f"{cfg.max_kb:,} KiB echoed and compared byte for byte, some idle for up to "
        f"{cfg.idle_max:g} s, some aborted mid-stream with an RST.",
        "",
        f"{c.done:,} connections ({c.bulk:,} echoed, {c.idle:,} idle, {c.aborted:,} aborted), "
        f"{c.bytes_checked / 1e9:,.2f} GB checked, {c.polls:,} dashboard polls: "
        f"**{c.errors} errors**.",
        "",
        table(["program", f"memory after warm-up ({cfg.warmup:g} s), MiB", "at the end, MiB",
               "allowed", "open files before", "after"], rows),
    ]
    if c.first_errors:
        md += ["", "First errors:", ""] + [f"- `{e}`" for e in c.first_errors[:5]]
    plots = []
    ts = [s.t / 60 for s in outcome.samples]
    series: dict[str, Callable[[Sample, str], float]] = {
        "resident memory (MiB)": lambda s, n: s.rss[n] / 2**20,
        "open files": lambda s, n: s.fds[n]}
    for (unit, get), what in zip(series.items(), ("memory", "files"), strict=True):
        fig, ax = new_figure()
        for name in outcome.memory:
            ax.plot(ts, [get(s, name) for s in outcome.samples], label=name)
        ax.axvline(cfg.warmup / 60, color="grey", linestyle=":", label="end of warm-up")
        label_plot(ax, "minutes of churn", unit, f"Soak: {unit} of each program under churn",
                   fontsize="small")
        plots.append(save_figure(fig, outdir / f"soak_{what}.png"))
    targets = [
        Target("soak errors", "0 errors under an hour of churn (issue 15)",
               f"{c.errors} in {c.done:,} connections over {cfg.duration / 60:g} min",
               c.errors == 0),
        Target("soak memory", "no growth after warm-up (within 10 % + 8 MiB) (issue 15)",
               "grew: " + ", ".join(outcome.grew) if outcome.grew else "none grew",
               not outcome.grew),
        Target("soak open files", "back to the level before the churn (issue 15)",
               "more: " + ", ".join(outcome.leaked_files) if outcome.leaked_files
               else "all back", not outcome.leaked_files),
    ]
    return ScenarioResult(NAME, TITLE, outcome.data(), "\n".join(md), plots, targets)


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    seconds = float(os.environ.get("NOPF_SOAK_SECONDS", "3600"))
    cfg = Config.quick() if quick else Config(duration=seconds,
                                              warmup=min(300.0, seconds / 4))
    return result(soak(cfg, progress), outdir)


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scn_soak", description=TITLE)
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of churn")
    ap.add_argument("--warmup", type=float, help="seconds before memory is compared "
                    "(default a quarter of the duration, at most 300)")
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--idle-max", type=float, help="longest idle connection, s "
                    "(default 240; a sixth of the duration, at most 20, under 10 minutes)")
    ap.add_argument("--max-kb", type=int, default=2048)
    ap.add_argument("--sample-every", type=float, help="seconds between samples")
    ap.add_argument("--outdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--json", type=Path, help="write the result's data here")
    a = ap.parse_args(args)
    short = a.duration < 600
    cfg = Config.quick(a.duration) if short else Config(duration=a.duration)
    cfg.concurrency, cfg.max_kb = a.concurrency, a.max_kb
    cfg.warmup = a.warmup if a.warmup is not None else min(300.0, a.duration / 4)
    if a.idle_max is not None:
        cfg.idle_max = a.idle_max
    if a.sample_every is not None:
        cfg.sample_every = a.sample_every
    clock = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[soak {time.monotonic() - clock:6.1f} s] {msg}", file=sys.stderr, flush=True)

    a.outdir.mkdir(parents=True, exist_ok=True)
    res = result(soak(cfg, progress), a.outdir)
    print(f"## {res.title}\n\n{res.markdown}")
    for t in res.targets:
        print(f"- target {t.name}: {t.goal}; measured {t.measured}: "
              f"{'met' if t.met else 'NOT met'}")
    if a.json:
        a.json.write_text(json.dumps(res.data, indent=1) + "\n", encoding="utf-8")
    return 0 if all(t.met for t in res.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
