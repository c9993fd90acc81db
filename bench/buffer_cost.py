"""Where the tunnel's buffer cost goes, on loopback: CPU and page faults per GB at the sender.

An experiment (issue 16). Several sending relays side by side, each a process
of its own, one loopback transfer through each in turn per round (alternating,
so they share the machine's moods; one 64 MB warm-up transfer each first), and
for each transfer the sending process's user and system CPU time and minor
page faults (``/proc/PID/stat``, all its threads) per GB carried:

- ``bench.pump_floor`` near ends (``--mode thread``, or ``--mode alloc`` with
  some of the tunnel's buffer habits, ``--habits``), all to one far end
  (``--mode thread``) and one counting sink;
- the real tunnel (``bench.secure``'s two ends: SPAKE2, records, resume, mux),
  as shipped, without its ``mallopt`` (glibc's defaults), or without it and
  with ``GLIBC_TUNABLES`` set for both of its processes.

    .venv/bin/python -m bench.buffer_cost [--size-mb 512] [--rounds 5]
        [--only NAME,...] [--json out.json]

A variant's ``tunables`` is put in ``GLIBC_TUNABLES`` for its processes
(glibc reads it at start; ``mallopt`` later overrides the same knobs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from bench import secure
from bench.measure import environ
from bench.report import write_json
from nopf_web.wire.frames import INITIAL_WINDOW

ROOT = Path(__file__).resolve().parents[1]
PSK = bytes(range(32)).hex()
TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "floor" (a pump_floor near end) or "tunnel"
    mode: str = "thread"  # floor: --mode
    habits: str = ""  # floor, --mode alloc: --habits
    mallopt: bool = True  # tunnel: ResumableChannel's mallopt at start
    tunables: str = ""  # GLIBC_TUNABLES for its processes


VARIANTS = (
    Variant("floor: one reused buffer", "floor", "thread"),
    Variant("floor: the tunnel's habits (fresh, copy, keep, mallopt)", "floor", "alloc",
            "fresh,copy,keep,mallopt"),
    Variant("floor: fresh, copy, keep; glibc defaults", "floor", "alloc", "fresh,copy,keep"),
    Variant("floor: fresh, copy, keep; GLIBC_TUNABLES", "floor", "alloc", "fresh,copy,keep",
            tunables=TUNABLES),
    Variant("floor: fresh, copy (none kept), mallopt", "floor", "alloc", "fresh,copy,mallopt"),
    Variant("floor: fresh, keep (no copy), mallopt", "floor", "alloc", "fresh,keep,mallopt"),
    Variant("floor: fresh only, mallopt", "floor", "alloc", "fresh,mallopt"),
    Variant("floor: fresh, keep, sealed from 2 parts by streaming GCM (no copy), mallopt",
            "floor", "alloc", "fresh,keep,scatter,mallopt"),
    Variant("floor: copy only (warm)", "floor", "alloc", "copy"),
    Variant("floor: pool of 8 MiB of reused buffers, copy", "floor", "alloc", "copy,keep"),
    Variant("floor: pool of 8 MiB of reused buffers, no copy", "floor", "alloc", "keep"),
    Variant("tunnel: as shipped (mallopt)", "tunnel"),
    Variant("tunnel: glibc defaults", "tunnel", mallopt=False),
    Variant("tunnel: GLIBC_TUNABLES", "tunnel", mallopt=False, tunables=TUNABLES),
)


def proc_stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _env(tunables: str) -> AbstractContextManager[None]:
    """GLIBC_TUNABLES for the processes started inside ("": glibc's defaults)."""
    return environ("GLIBC_TUNABLES", tunables or None)


def _floor(end: str, mode: str, habits: str, to: int) -> tuple[subprocess.Popen[bytes], int]:
    """A ``bench.pump_floor`` end (its environment: this process's, see :func:`_env`);
    its port once it listens."""
    command = [sys.executable, "-m", "bench.pump_floor", end, "--mode", mode,
               "--listen", "127.0.0.1:0", "--to", f"127.0.0.1:{to}", "--key", PSK]
    if habits:
        command += ["--habits", habits]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("listening "):
        proc.kill()
        proc.wait(5)
        raise SystemExit(f"bench.pump_floor {end} did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def _port(rx: Connection, what: str) -> int:
    """The port a started process reports on ``rx`` once it listens (20 s at most)."""
    if not rx.poll(20):
        raise SystemExit(f"{what} reported no port within 20 s")
    port = rx.recv()
    assert isinstance(port, int)
    return port


def _no_mallopt(target: Callable[..., None], *args: object) -> None:
    """Run a tunnel end without ResumableChannel's mallopt (glibc's defaults)."""
    from nopf_web.tunnel import resumable

    resumable._keep_freed_memory = lambda: None
    target(*args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="variants whose name contains one of these")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    variants = [v for v in VARIANTS if not wanted or any(w in v.name for w in wanted)]
    size = args.size_mb * 1_000_000
    ctx = mp.get_context("spawn")
    popens: list[subprocess.Popen[bytes]] = []
    procs: list[mp.process.BaseProcess] = []
    senders: dict[str, tuple[int, int]] = {}  # name: (listening port, sending pid)
    try:
        rx, tx = ctx.Pipe(duplex=False)
        with _env(""):
            procs.append(ctx.Process(target=secure.service_proc, args=(tx,), daemon=True))
            procs[-1].start()
            sink = _port(rx, "the sink")
            far, far_port = _floor("far", "thread", "", sink)
            popens.append(far)
        for v in variants:
            if v.kind == "floor":
                with _env(v.tunables):
                    near, port = _floor("near", v.mode, v.habits, far_port)
                popens.append(near)
                senders[v.name] = (port, near.pid)
                continue
            wrap = (lambda t: (t,)) if v.mallopt else (lambda t: (_no_mallopt, t))
            with _env(v.tunables):
                share = wrap(secure.share_proc)
                procs.append(ctx.Process(target=share[0], daemon=True,
                                         args=(*share[1:], sink, tx, False,
                                               INITIAL_WINDOW, "resumable")))
                procs[-1].start()
                tunnel_port = _port(rx, f"{v.name}: the sharing end")
                connect = wrap(secure.connect_proc)
                procs.append(ctx.Process(target=connect[0], daemon=True,
                                         args=(*connect[1:], tunnel_port, tx, False,
                                               INITIAL_WINDOW, "resumable")))
                procs[-1].start()
                connect_pid = procs[-1].pid
                assert connect_pid is not None
                senders[v.name] = (_port(rx, f"{v.name}: the connecting end"), connect_pid)

        for port, _ in senders.values():  # warm up: first faults, heaps grown
            secure.throughput(port, 64_000_000)
        per_gb: dict[str, list[tuple[float, float, float, float]]] = {v.name: [] for v in
                                                                        variants}
        for r in range(args.rounds):
            for name, (port, pid) in senders.items():
                print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                before = proc_stat(pid)
                mb_s = secure.throughput(port, size)
                after = proc_stat(pid)
                gb = size / 1e9
                per_gb[name].append(((after[0] - before[0]) / gb, (after[1] - before[1]) / gb,
                                     (after[2] - before[2]) / gb, mb_s))
    finally:
        for p in reversed(popens):
            p.kill()
            p.wait(5)
        for q in reversed(procs):
            q.terminate()
        for q in procs:
            q.join(5)

    rows = {}
    print(f"| sender ({args.rounds} rounds of {args.size_mb} MB, medians) | MB/s "
          f"| user CPU-s/GB | system CPU-s/GB | minor faults per GB |\n|---|---|---|---|---|")
    for name, samples in per_gb.items():
        user, system, faults, mb_s = (statistics.median(s[i] for s in samples)
                                      for i in range(4))
        rows[name] = {"user_s_per_gb": user, "system_s_per_gb": system,
                      "minor_faults_per_gb": faults, "mb_s": mb_s, "samples": samples}
        print(f"| {name} | {mb_s:.0f} | {user:.2f} | {system:.2f} | {faults:,.0f} |")
    write_json(args.json, {"size_mb": args.size_mb, "rounds": args.rounds,
                           "tunables": TUNABLES, "load": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
