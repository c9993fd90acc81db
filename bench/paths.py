"""The paths the suite measures, each started inside one no-NAT lab.

:class:`Bench` builds a lab with no NAT on either side (so that a direct path
exists), starts the counting/echo service in a1 as its own process (on the
public address, port 4000, and on ``127.0.0.1:3000`` for the tunnels) and the
rendezvous on rdv. Every :class:`Path` then gives an entry point ``(host,
port)`` reachable from b1, where the sender runs:

- ``direct``: a1's public address, port 4000 (the baseline);
- ``plain``: ``nopf -t client`` on b1's loopback, one punched seed-mode pipe
  per connection (the seed pipes exactly one connection);
- ``encrypted``: ``nopf connect CODE`` on b1's loopback, one tunnel made by
  ``nopf share`` in a1, every connection a stream over it;
- ``socat``: one ``socat`` relay on a1's public address, to the service on a1's
  loopback (sender -> relay -> sink, the relay beside the sink, like the
  tunnels' far end);
- ``socat2``: two ``socat -b 262144`` relays, one on b1's loopback and one on
  a1's public address, in the tunnels' topology (a relay at each end): the
  plain pipe's peer;
- ``ssh``: ``ssh -N -L`` in b1 to Debian's ``sshd`` in a1 (temporary host and
  user keys, default cipher);
- ``ssh_gcm``: the same with ``-c aes128-gcm@openssh.com``: the encrypted
  tunnel's peer;
- ``encrypted_base`` (only with ``NOPF_BENCH_BASE=DIR``): the encrypted tunnel
  run from another source tree, to compare two versions of the code in the
  same run.
- ``fowl``: fowl (Forward Over Wormhole Locally) from its own venv
  ``.venv-fowl``, with the magic-wormhole mailbox server on rdv.
- ``floor_async``, ``floor_thread`` (experiments, only when named in
  ``NOPF_BENCH_PATHS``): :mod:`bench.pump_floor`, the least a Python relay with
  the tunnel's records can do (AES-256-GCM records of up to 256 KiB, no mux, no
  resume), a near end on b1's loopback and a far end on a1's public address, in
  asyncio or with a blocking thread per direction: the floor of a Python design
  against ``ssh_gcm`` (issue 16);
- ``floor_alloc`` (an experiment too): ``bench.pump_floor --mode alloc``, the
  thread relay with the tunnel's buffer habits (fresh buffers per read and per
  opened record, reads kept for 8 MiB as the replay buffer keeps them);
  ``floor_nocopy`` and ``floor_pool`` (experiments): the same without the
  copy into the plaintext buffer (``--habits fresh,keep,mallopt``), or reading
  into a pool of 8 MiB of reused buffers sealed in place (``keep,mallopt``);
- ``floor_layers`` (an experiment too): :mod:`bench.pump_layers`, the thread
  relay carrying the tunnel's real record, resume and mux layers (one tunnel
  per connection).

``python -m bench.paths sink|bulk ...`` are the helper processes run inside the
namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import IO, Any

from bench.measure import CHUNK, send_bytes, serve_conn
from tests.e2e.peers import RDV, Pair, Peer, punch_pair, start_rendezvous
from tests.lab import Host, Lab
from tests.programs import argv, check_programs_run_this_tree

ROOT = FsPath(__file__).resolve().parent.parent
DIRECT_PORT = 4000  # the service on a1's public address
SERVICE_PORT = 3000  # the same service on a1's loopback, for the tunnels
SOCAT_PORT = 4100
SOCAT2_PORT = 4110  # the far relay of the two-socat path, on a1's public address
SSHD_PORT = 2222
FLOOR_PORT = 4120  # the far ends of the floor relays, on a1's public address (+0, +1)
MAILBOX_PORT = 4200
FOWL_VENV = ROOT / ".venv-fowl"
ORDER = ("direct", "plain", "encrypted", "socat", "socat2", "ssh", "ssh_gcm", "fowl")
LABELS = {"direct": "direct TCP", "plain": "nopf plain (seed)",
          "encrypted": "nopf encrypted", "socat": "socat relay",
          "socat2": "two socat relays", "ssh": "ssh -L", "ssh_gcm": "ssh -L aes128-gcm",
          "fowl": "fowl", "encrypted_base": "nopf encrypted (base tree)",
          "floor_async": "floor relay, asyncio", "floor_thread": "floor relay, threads",
          "floor_alloc": "floor relay, threads, the tunnel's buffers",
          "floor_layers": "threads + the tunnel's layers",
          "floor_nocopy": "floor relay, threads, the tunnel's buffers but no copy",
          "floor_pool": "floor relay, threads, a pool of 8 MiB of reused read buffers"}
# Measured only when named in NOPF_BENCH_PATHS (never by the suite's default run).
EXPERIMENTS = ("floor_async", "floor_thread", "floor_alloc", "floor_layers", "floor_nocopy",
               "floor_pool")
# Each nopf path's strongest peer in the same topology (a relay at each end).
PEERS = {"encrypted": "ssh_gcm", "plain": "socat2", "encrypted_base": "ssh_gcm",
         **dict.fromkeys(EXPERIMENTS, "ssh_gcm")}
# NOPF_BENCH_BASE=DIR adds ``encrypted_base``: the encrypted tunnel from that source tree.
BASE_ENV = "NOPF_BENCH_BASE"

Progress = Callable[[str], None]


def path_notes(data: dict[str, Any]) -> list[str]:
    """Markdown bullets: what each path ran with (``info``) and why any is absent."""
    out = [f"- {LABELS[name]}: " + "; ".join(f"{k}: {v}" for k, v in info.items())
           for name, info in data.get("info", {}).items()]
    out += [f"- {LABELS[name]}: **not measured**: {why}"
            for name, why in data.get("absent", {}).items()]
    return out


class PathUnavailable(RuntimeError):
    """This path cannot be measured here (a tool is missing or does not start)."""


# -- small helpers -------------------------------------------------------------


def process_tree(pids: list[int]) -> list[int]:
    """These processes and their live descendants."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(k) for k in
                         FsPath(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            continue  # gone meanwhile
    return seen


def user_system(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes and their live descendants.

    Children's times (``cutime``/``cstime``) are included, so CPU of a forked
    helper that exits between two readings is not lost.
    """
    user = system = 0
    for pid in process_tree(pids):
        try:
            fields = FsPath(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            u, s, cu, cs = (int(f) for f in fields[11:15])
        except (OSError, ValueError):
            continue  # gone meanwhile
        user += u + cu
        system += s + cs
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their live descendants."""
    return sum(user_system(pids))


def wait_listening(host: Host, port: int, timeout: float, what: str) -> None:
    """Wait until something in ``host`` listens on TCP ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise PathUnavailable(f"{what}: nothing listened on port {port} within {timeout} s")


def wait_text(read: Callable[[], str], pattern: str, timeout: float, what: str,
              proc: subprocess.Popen[bytes] | None = None) -> re.Match[str]:
    """Wait until ``read()`` matches ``pattern`` (a process's log, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, read())
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = read()[-400:].strip().replace("\n", " | ")
    raise PathUnavailable(f"{what}: no {pattern!r} within {timeout} s; log: {tail}")


def stop_proc(proc: subprocess.Popen[bytes] | None, grace: float = 3) -> None:
    """Terminate one process we started (by its pid), kill it after ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _log_reader(f: IO[bytes]) -> Callable[[], str]:
    def read() -> str:
        f.flush()
        f.seek(0)
        return f.read().decode(errors="replace")
    return read


# -- the lab -------------------------------------------------------------------


class Bench:
    """A no-NAT lab with the service in a1 and the rendezvous on rdv."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lab = Lab("none", "none")
        self.rate_mbit = 0.0
        self._sink: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Bench:
        check_programs_run_this_tree()  # else "nopf encrypted" is another tree's code
        self.lab.up()
        try:
            self._sink = self.lab.a1.popen(
                [sys.executable, "-m", "bench.paths", "sink"], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert self._sink.stdout is not None
            ready, _, _ = select.select([self._sink.stdout], [], [], 20)
            if not ready or self._sink.stdout.readline().strip() != b"ready":
                raise RuntimeError("bench: the service in a1 did not start within 20 s")
            start_rendezvous(self.lab)
        except BaseException:
            self.lab.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.down()  # stops every process started in the lab, by pid

    def shape(self, rate_mbit: float) -> None:
        """Shape inet's links to both sites (tc tbf), so the network is the bottleneck."""
        for dev in ("to-a", "to-b"):
            if self.rate_mbit:
                self.lab.inet.run(["tc", "qdisc", "del", "dev", dev, "root"])
            if rate_mbit:
                self.lab.inet.run(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                   f"{rate_mbit}mbit", "burst", "512k", "latency", "20ms"])
        self.rate_mbit = rate_mbit

    def connect(self, entry: tuple[str, int], timeout: float = 60) -> socket.socket:
        """A connection from b1 to a path's entry point."""
        with self.lab.b1.enter():
            return socket.create_connection(entry, timeout=timeout)

    def bulk(self, entry: tuple[str, int], seconds: float) -> subprocess.Popen[bytes]:
        """A sender process in b1 that moves data to ``entry`` until its stdin closes."""
        return self.lab.b1.popen(
            [sys.executable, "-m", "bench.paths", "bulk", entry[0], str(entry[1]), str(seconds)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def load(self, entry: tuple[str, int], conns: int, seconds: float,
             size: int) -> subprocess.Popen[bytes]:
        """A process in b1 that keeps one request in flight on each of ``conns`` echo
        connections to ``entry`` for ``seconds``; it prints ``answered seconds``."""
        return self.lab.b1.popen(
            [sys.executable, "-m", "bench.paths", "load", entry[0], str(entry[1]), str(conns),
             str(seconds), str(size)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- the paths -----------------------------------------------------------------


class Path:
    """One way from b1 to the service in a1. ``entry()`` per connection."""

    name = ""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.lab = bench.lab
        self.info: dict[str, str] = {}  # facts worth reporting (cipher, placement...)

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def start(self) -> None:
        """Start long-lived processes; raise PathUnavailable if it cannot run here."""

    def entry(self) -> tuple[str, int]:
        """Where the next connection from b1 goes (sets up per-connection state)."""
        raise NotImplementedError

    def release(self) -> None:
        """After the connections opened since the last release are closed."""

    def ends(self) -> dict[str, list[int]]:
        """The path's processes by end: ``b1`` (the sender's side) and ``a1``
        (the service's side); their CPU time is the path's cost."""
        return {"b1": [], "a1": []}

    def pids(self) -> list[int]:
        """Processes whose CPU time is this path's cost (both ends)."""
        return [pid for pids in self.ends().values() for pid in pids]

    def stop(self) -> None:
        """Stop what :meth:`start` started."""


class Direct(Path):
    name = "direct"

    def entry(self) -> tuple[str, int]:
        return (self.lab.a1.ip, DIRECT_PORT)


class Plain(Path):
    """Seed mode: a fresh punched pair of ``nopf`` processes per connection."""

    name = "plain"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.pairs: list[Pair] = []
        self._next = 0

    def entry(self) -> tuple[str, int]:
        port = 3010 + self._next % 40  # two open at once for latency under bulk
        self._next += 1
        pair = punch_pair(self.lab, gap=0.2, client_port=port, server_port=SERVICE_PORT)
        self.pairs.append(pair)
        line = pair.server.line(20)
        if not line.startswith("Started pipe"):
            raise RuntimeError(f"nopf plain: no pipe: {line!r}; {pair.server.stderr()[-300:]}")
        return ("127.0.0.1", port)

    def ends(self) -> dict[str, list[int]]:
        return {"b1": [pair.client.proc.pid for pair in self.pairs
                       if pair.client.proc.poll() is None],
                "a1": [pair.server.proc.pid for pair in self.pairs
                       if pair.server.proc.poll() is None]}

    def release(self) -> None:
        for pair in self.pairs:
            for peer in (pair.server, pair.client):
                try:
                    peer.wait(20)
                except subprocess.TimeoutExpired:
                    stop_proc(peer.proc)
        self.pairs.clear()

    def stop(self) -> None:
        for pair in self.pairs:
            stop_proc(pair.server.proc)
            stop_proc(pair.client.proc)
        self.pairs.clear()


class Encrypted(Path):
    """``nopf share`` in a1 and ``nopf connect CODE`` in b1: one tunnel, many streams."""

    name = "encrypted"
    PORT = 3060

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.peers: list[Peer] = []

    def _command(self, *args: str) -> tuple[list[str], dict[str, str] | None]:
        return argv("nopf", *args), None

    def _start(self, host: Host, *args: str) -> Peer:
        command, env = self._command(*args, "-a", RDV, "--timeout", "15")
        peer = Peer.start(host, command, args[0], env=env)
        self.peers.append(peer)
        return peer

    def start(self) -> None:
        sharer = self._start(self.lab.a1, "share", "-p", str(SERVICE_PORT))
        code = sharer.line(15)
        if not code:
            raise RuntimeError(f"nopf share printed no code: {sharer.stderr()[-300:]}")
        joiner = self._start(self.lab.b1, "connect", code, "-p", str(self.PORT))
        for peer in (joiner, sharer):
            wait_text(peer.stderr, "encrypted tunnel to", 30, f"nopf {peer.role}", peer.proc)
        self.info["tunnel"] = "SPAKE2 + AES-256-GCM records, one punched TCP connection"

    def entry(self) -> tuple[str, int]:
        return ("127.0.0.1", self.PORT)

    def ends(self) -> dict[str, list[int]]:
        live = {p.role: [p.proc.pid] for p in self.peers if p.proc.poll() is None}
        return {"b1": live.get("connect", []), "a1": live.get("share", [])}

    def stop(self) -> None:
        for peer in self.peers:
            stop_proc(peer.proc)


class EncryptedBase(Encrypted):
    """The encrypted tunnel run from the source tree in ``NOPF_BENCH_BASE``."""

    name = "encrypted_base"
    PORT = 3062

    def _command(self, *args: str) -> tuple[list[str], dict[str, str] | None]:
        base = os.environ.get(BASE_ENV, "")
        if not base or not (FsPath(base) / "nopf_web").is_dir():
            raise PathUnavailable(f"{BASE_ENV}={base!r} is not a source tree of nopf")
        # PYTHONSAFEPATH: without it ``-m`` puts the working directory (this
        # tree, where the bench runs) ahead of PYTHONPATH, and the "base" ran
        # this tree's code.
        env = {**os.environ, "PYTHONPATH": base, "PYTHONSAFEPATH": "1"}
        return [sys.executable, "-m", "nopf_web.cli.peer", *args], env

    def start(self) -> None:
        super().start()
        self.info["tree"] = os.environ.get(BASE_ENV, "")


class Socat(Path):
    name = "socat"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("socat") is None:
            raise PathUnavailable("socat is not installed (apt-get install socat)")
        a1 = self.lab.a1
        self.proc = a1.popen(["socat", f"TCP-LISTEN:{SOCAT_PORT},bind={a1.ip},fork,reuseaddr",
                              f"TCP:127.0.0.1:{SERVICE_PORT}"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(a1, SOCAT_PORT, 10, "socat")
        self.info["placement"] = ("one socat in a1 on its public address, forwarding to the "
                                  "service on a1's loopback (default 8 KiB buffer)")

    def entry(self) -> tuple[str, int]:
        return (self.lab.a1.ip, SOCAT_PORT)

    def ends(self) -> dict[str, list[int]]:
        return {"b1": [], "a1": [self.proc.pid] if self.proc is not None else []}

    def stop(self) -> None:
        stop_proc(self.proc)


class Socat2(Path):
    """Two ``socat -b 262144`` relays, one at each end (the tunnels' topology): b1's
    loopback -> a1's public address -> the service on a1's loopback."""

    name = "socat2"
    PORT = 3090
    BUFFER = 262144

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.near: subprocess.Popen[bytes] | None = None
        self.far: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("socat") is None:
            raise PathUnavailable("socat is not installed (apt-get install socat)")
        a1, b1, size = self.lab.a1, self.lab.b1, str(self.BUFFER)
        self.far = a1.popen(["socat", "-b", size,
                             f"TCP-LISTEN:{SOCAT2_PORT},bind={a1.ip},fork,reuseaddr",
                             f"TCP:127.0.0.1:{SERVICE_PORT}"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.near = b1.popen(["socat", "-b", size,
                              f"TCP-LISTEN:{self.PORT},bind=127.0.0.1,fork,reuseaddr",
                              f"TCP:{a1.ip}:{SOCAT2_PORT}"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(a1, SOCAT2_PORT, 10, "socat (a1)")
        wait_listening(b1, self.PORT, 10, "socat (b1)")
        self.info["placement"] = (f"socat -b {size} on b1's loopback -> socat -b {size} on "
                                  "a1's public address -> the service on a1's loopback "
                                  "(one process per connection at each end)")

    def entry(self) -> tuple[str, int]:
        return ("127.0.0.1", self.PORT)

    def ends(self) -> dict[str, list[int]]:
        return {"b1": [self.near.pid] if self.near is not None else [],
                "a1": [self.far.pid] if self.far is not None else []}

    def stop(self) -> None:
        stop_proc(self.near)
        stop_proc(self.far)


class Ssh(Path):
    """OpenSSH port forwarding: ``ssh -N -L`` in b1, Debian's ``sshd`` in a1."""

    name = "ssh"
    PORT = 3070
    SSHD_PORT = SSHD_PORT
    CIPHER: str | None = None  # None: the default one negotiated

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.sshd: subprocess.Popen[bytes] | None = None
        self.ssh: subprocess.Popen[bytes] | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="nopf-bench-ssh-")
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()

    def start(self) -> None:
        sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd_bin) or shutil.which("ssh") is None:
            raise PathUnavailable("openssh-server / openssh-client are not installed")
        d = FsPath(self.tmp.name)
        for key in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                           check=True, capture_output=True, timeout=20)
        (d / "authorized_keys").write_text((d / "user.pub").read_text())
        a1 = self.lab.a1
        (d / "sshd_config").write_text(
            f"ListenAddress {a1.ip}:{self.SSHD_PORT}\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile none\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nAllowTcpForwarding yes\nUseDNS no\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.sshd = a1.popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        wait_listening(a1, self.SSHD_PORT, 10, "sshd")
        self.ssh = self.lab.b1.popen(
            ["ssh", "-v", "-N", "-F", "none", "-i", str(d / "user"), "-p", str(self.SSHD_PORT),
             *(["-c", self.CIPHER] if self.CIPHER else []),
             "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "-o", "ExitOnForwardFailure=yes",
             "-L", f"127.0.0.1:{self.PORT}:127.0.0.1:{SERVICE_PORT}", f"root@{a1.ip}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        read = _log_reader(self.log)
        wait_text(read, "Entering interactive session", 20, "ssh -L", self.ssh)
        m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", read())
        if m:
            self.info["cipher"] = m.group(1) + ("" if m.group(2) == "<implicit>"
                                                else f" + {m.group(2)}")
        self.info["version"] = (read().splitlines() or ["?"])[0].strip()

    def entry(self) -> tuple[str, int]:
        return ("127.0.0.1", self.PORT)

    def ends(self) -> dict[str, list[int]]:
        return {end: [p.pid] if p is not None and p.poll() is None else []
                for end, p in (("b1", self.ssh), ("a1", self.sshd))}

    def stop(self) -> None:
        stop_proc(self.ssh)
        stop_proc(self.sshd)
        self.log.close()
        self.tmp.cleanup()


class SshGcm(Ssh):
    """``ssh -L`` with AES-128-GCM, OpenSSH's fastest cipher on AES-NI machines."""

    name = "ssh_gcm"
    PORT = 3071
    SSHD_PORT = SSHD_PORT + 1
    CIPHER = "aes128-gcm@openssh.com"


class Fowl(Path):
    """fowl from its own venv, with a magic-wormhole mailbox on rdv."""

    name = "fowl"
    PORT = 3080
    # fowl hard-codes the public transit relay as a Dilation hint; blank it so that
    # nothing ever tries an address outside the lab (peers connect directly here).
    LAUNCH = ("import sys, wormhole.cli.public_relay as r; r.TRANSIT_RELAY = None; "
              "from fowl.cli import fowl; sys.argv[0] = 'fowl'; fowl()")

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="nopf-bench-fowl-")

    def _popen(self, host: Host, args: list[str]) -> tuple[subprocess.Popen[bytes],
                                                            Callable[[], str]]:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        proc = host.popen(args, cwd=self.tmp.name, stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        self.procs.append(proc)
        self.logs.append(log)
        return proc, _log_reader(log)

    def start(self) -> None:
        py = FOWL_VENV / "bin" / "python"
        if not py.exists():
            raise PathUnavailable(f"no {FOWL_VENV.name}: create it with `python3 -m venv "
                                  f"{FOWL_VENV.name} && {FOWL_VENV.name}/bin/pip install "
                                  "fowl magic-wormhole-mailbox-server`")
        check = subprocess.run([str(py), "-c", "import fowl, wormhole_mailbox_server"],
                               capture_output=True, timeout=60, check=False)
        if check.returncode:
            raise PathUnavailable("fowl or magic-wormhole-mailbox-server is not importable in "
                                  f"{FOWL_VENV.name}: {check.stderr.decode()[-200:]}")
        self._popen(self.lab.rdv, [
            str(FOWL_VENV / "bin" / "twist"), "wormhole-mailbox",
            f"--port=tcp:{MAILBOX_PORT}:interface=0.0.0.0"])  # IPv6 is off in the lab
        wait_listening(self.lab.rdv, MAILBOX_PORT, 30, "wormhole mailbox server")
        url = f"ws://{self.lab.rdv.ip}:{MAILBOX_PORT}/v1"
        share, sread = self._popen(self.lab.a1, [
            str(py), "-c", self.LAUNCH, "--mailbox", url, "--no-logo",
            "--remote", f"bench:{SERVICE_PORT}"])
        code = wait_text(sread, r"\b(\d+-[a-z]+-[a-z]+)\b", 30, "fowl (share)", share).group(1)
        join, jread = self._popen(self.lab.b1, [
            str(py), "-c", self.LAUNCH, "--mailbox", url, "--no-logo",
            "--local", f"bench:{self.PORT}:remote-connect={SERVICE_PORT}", code])
        # The status shows the peer's hint once the Dilation connection is up.
        wait_text(jread, r"hint\s+\S+\s+(<-|->)tcp:", 40, "fowl (join)", join)
        wait_listening(self.lab.b1, self.PORT, 10, "fowl (join)")
        self.info["version"] = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('fowl'))"],
            capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        self.info["mailbox"] = "magic-wormhole-mailbox-server on rdv; transit relay disabled"

    def entry(self) -> tuple[str, int]:
        return ("127.0.0.1", self.PORT)

    def ends(self) -> dict[str, list[int]]:
        # procs: the mailbox (not the path's cost), the sharer in a1, the joiner in b1.
        live = [p.pid if p.poll() is None else None for p in self.procs[1:3]]
        return {"b1": [pid for pid in live[1:2] if pid], "a1": [pid for pid in live[:1] if pid]}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_proc(proc)
        for log in self.logs:
            log.close()
        self.tmp.cleanup()


class FloorAsync(Path):
    """:mod:`bench.pump_floor` in asyncio: a near end on b1's loopback, a far end on
    a1's public address in front of the service, a fresh pre-shared key per start."""

    name = "floor_async"
    MODE = "async"
    HABITS = ""  # --mode alloc: --habits (empty: all of them)
    PORT = 3100  # the near end, on b1's loopback
    FAR_PORT = FLOOR_PORT

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()

    def _popen(self, host: Host, end: str, listen: str, to: str, key: str) -> None:
        self.procs[end] = host.popen(
            [sys.executable, "-m", "bench.pump_floor", end, "--mode", self.MODE,
             "--listen", listen, "--to", to, "--key", key,
             *(["--habits", self.HABITS] if self.HABITS else [])],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)

    def start(self) -> None:
        a1, b1, key = self.lab.a1, self.lab.b1, os.urandom(32).hex()
        self._popen(a1, "far", f"{a1.ip}:{self.FAR_PORT}", f"127.0.0.1:{SERVICE_PORT}", key)
        self._popen(b1, "near", f"127.0.0.1:{self.PORT}", f"{a1.ip}:{self.FAR_PORT}", key)
        wait_listening(a1, self.FAR_PORT, 20, f"{self.label} (a1)")
        wait_listening(b1, self.PORT, 20, f"{self.label} (b1)")
        self.info["relay"] = (f"bench.pump_floor --mode {self.MODE}: AES-256-GCM records of "
                              "up to 256 KiB, no mux, no resume, pre-shared key (an experiment)")

    def entry(self) -> tuple[str, int]:
        return ("127.0.0.1", self.PORT)

    def ends(self) -> dict[str, list[int]]:
        return {host: [p.pid] if (p := self.procs.get(end)) and p.poll() is None else []
                for host, end in (("b1", "near"), ("a1", "far"))}

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_proc(proc)
        self.log.close()


class FloorThread(FloorAsync):
    """:mod:`bench.pump_floor` with blocking sockets, a thread per direction."""

    name = "floor_thread"
    MODE = "thread"
    PORT = 3101
    FAR_PORT = FLOOR_PORT + 1


class FloorAlloc(FloorAsync):
    """:mod:`bench.pump_floor` threads with the tunnel's buffer habits."""

    name = "floor_alloc"
    MODE = "alloc"
    PORT = 3103
    FAR_PORT = FLOOR_PORT + 3


class FloorNoCopy(FloorAlloc):
    """``floor_alloc`` whose reads are sealed where they are, not copied first."""

    name = "floor_nocopy"
    HABITS = "fresh,keep,mallopt"
    PORT = 3104
    FAR_PORT = FLOOR_PORT + 4


class FloorPool(FloorAlloc):
    """``floor_alloc`` reading into a pool of 8 MiB of reused buffers, sealed in place."""

    name = "floor_pool"
    HABITS = "keep,mallopt"
    PORT = 3105
    FAR_PORT = FLOOR_PORT + 5


class FloorLayers(FloorAsync):
    """:mod:`bench.pump_layers`: threads, with the tunnel's machines on the wire."""

    name = "floor_layers"
    PORT = 3102
    FAR_PORT = FLOOR_PORT + 2

    def _popen(self, host: Host, end: str, listen: str, to: str, key: str) -> None:
        del key  # in-band SPAKE2 with a fixed code instead
        self.procs[end] = host.popen(
            [sys.executable, "-m", "bench.pump_layers", end, "--listen", listen, "--to", to],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)

    def start(self) -> None:
        super().start()
        self.info["relay"] = ("bench.pump_layers: threads; the tunnel's record, resume and "
                              "mux machines; one tunnel per connection (an experiment)")


KINDS: dict[str, type[Path]] = {
    "direct": Direct, "plain": Plain, "encrypted": Encrypted, "socat": Socat,
    "socat2": Socat2, "ssh": Ssh, "ssh_gcm": SshGcm, "fowl": Fowl,
    "encrypted_base": EncryptedBase, "floor_async": FloorAsync, "floor_thread": FloorThread,
    "floor_alloc": FloorAlloc, "floor_layers": FloorLayers, "floor_nocopy": FloorNoCopy,
    "floor_pool": FloorPool}


def path_names(spec: str, what: str = "--paths") -> tuple[str, ...]:
    """The path names of a comma-separated ``spec``; ValueError (one line, naming
    ``what``) for an unknown one or none."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        which = f"unknown path {', '.join(unknown)}" if unknown else "no path named"
        raise ValueError(f"{what}: {which}; choose from {', '.join(KINDS)}")
    return names


def path_list(spec: str) -> tuple[str, ...]:
    """:func:`path_names` as an argparse ``type``: its error becomes the option's."""
    try:
        return path_names(spec, "")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(": ")) from None


def default_paths() -> tuple[str, ...]:
    """Every path the suite compares (``encrypted_base`` too when NOPF_BENCH_BASE is
    set); ``NOPF_BENCH_PATHS=direct,encrypted,...`` narrows a run by hand (direct
    is always kept: every figure is a ratio to it) and is the only way to add the
    :data:`EXPERIMENTS`."""
    names = (*ORDER, "encrypted_base") if os.environ.get(BASE_ENV) else ORDER
    spec = os.environ.get("NOPF_BENCH_PATHS", "")
    chosen = path_names(spec, "NOPF_BENCH_PATHS") if spec.strip(", ") else ()
    names = (*names, *(n for n in EXPERIMENTS if n in chosen))
    return tuple(n for n in names if not chosen or n == "direct" or n in chosen)


@contextlib.contextmanager
def started(bench: Bench, names: tuple[str, ...] | None = None,
            ) -> Iterator[tuple[dict[str, Path], dict[str, str]]]:
    """Start the named paths (default: :func:`default_paths`); yield (running paths,
    {name: why it is absent})."""
    names = default_paths() if names is None else names
    running: dict[str, Path] = {}
    absent: dict[str, str] = {}
    try:
        for name in names:
            path = KINDS[name](bench)
            bench.progress(f"starting {path.label}")
            try:
                path.start()
            except (PathUnavailable, RuntimeError, OSError, AssertionError,
                    subprocess.SubprocessError) as exc:
                path.stop()
                absent[name] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                bench.progress(f"{path.label} not available: {absent[name]}")
                continue
            running[name] = path
        yield running, absent
    finally:
        for path in running.values():
            path.stop()


# -- helper processes inside the namespaces ------------------------------------


def _sink() -> None:
    """The counting/echo service on a1's public address and on its loopback."""
    servers = [socket.create_server(("0.0.0.0", DIRECT_PORT), backlog=128),
               socket.create_server(("127.0.0.1", SERVICE_PORT), backlog=128)]

    def accept(lsock: socket.socket) -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_serve_quietly, args=(conn,), daemon=True).start()

    for lsock in servers:
        threading.Thread(target=accept, args=(lsock,), daemon=True).start()
    print("ready", flush=True)
    while True:  # ends when the lab stops it
        time.sleep(3600)


def _serve_quietly(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # a peer that vanished mid-transfer
        if conn.recv(1, socket.MSG_PEEK) == b"N":
            _count_sized(conn)
        else:
            serve_conn(conn)


def _count_sized(conn: socket.socket) -> None:
    """``N`` + 8-byte size: count that many bytes, answer the count; no half-close needed."""
    with conn:
        head = b""
        while len(head) < 9 and (part := conn.recv(9 - len(head))):
            head += part
        left = int.from_bytes(head[1:], "big")
        buf = bytearray(CHUNK)
        total = 0
        while total < left and (n := conn.recv_into(buf, min(CHUNK, left - total))):
            total += n
        conn.sendall(total.to_bytes(8, "big"))


def send_sized(sock: socket.socket, size: int) -> float:
    """Send ``size`` bytes to the service in sized mode, wait for its count; MB/s.

    Unlike :func:`bench.measure.send_counted` the end is announced up front, not
    by a half-close, which fowl does not carry (it closes the whole subchannel).
    """
    sock.sendall(b"N" + size.to_bytes(8, "big"))
    t0 = time.perf_counter()
    send_bytes(sock, size)
    got = int.from_bytes(sock.recv(8), "big")
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"the service counted {got} bytes, expected {size}")
    return size / elapsed / 1e6


def _bulk(host: str, port: int, seconds: float) -> None:
    """Send to the service until stdin closes (or ``seconds``); print MB/s."""
    payload = memoryview(bytearray(os.urandom(CHUNK)))
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(b"N" + (1 << 62).to_bytes(8, "big"))  # sized mode, ended by closing
    t0 = time.perf_counter()
    sent = 0
    while time.perf_counter() - t0 < seconds:
        if select.select([sys.stdin], [], [], 0)[0]:
            break  # stdin closed or written: stop
        sock.sendall(payload[:256 * 1024])
        sent += 256 * 1024
    sock.close()
    print(f"{sent / (time.perf_counter() - t0) / 1e6:.1f}", flush=True)


LOAD_STALL = 10.0  # seconds without any answer before the load gives up


def _answered(sock: socket.socket, buf: bytearray, request: bytes) -> bool:
    """Read what ``sock`` has into ``buf``; True (and the answer taken out of
    ``buf``) once it holds a whole answer, which must be ``request`` echoed."""
    data = sock.recv(65536)
    if not data:
        raise SystemExit("load: the path closed a connection in the middle of the run")
    buf += data
    if len(buf) < len(request):
        return False
    if buf[:len(request)] != request:
        raise SystemExit("load: an answer differs from its request")
    del buf[:len(request)]
    return True


def _load(host: str, port: int, conns: int, seconds: float, size: int) -> None:
    """``conns`` echo connections, each with one ``size``-byte request in flight
    at a time (closed loop), for ``seconds``; print the requests answered and
    the seconds taken. Every answer is checked byte for byte."""
    socks = [socket.create_connection((host, port), timeout=60) for _ in range(conns)]
    request = os.urandom(size)
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"E")  # echo mode
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, data=(sock, bytearray()))
        sock.send(request)  # a request this small always fits the socket buffer
    # A first answer on each before the clock starts: the path is up.
    waiting = set(socks)
    deadline = time.perf_counter() + LOAD_STALL
    while waiting:
        if time.perf_counter() > deadline:
            raise SystemExit(f"load: {len(waiting)} of {conns} connections had no first "
                             f"answer within {LOAD_STALL:g} s")
        for key, _ in sel.select(1.0):
            sock, buf = key.data
            if _answered(sock, buf, request):
                waiting.discard(sock)
    done = 0
    t0 = last = time.perf_counter()  # last: when an answer last came
    end = t0 + seconds
    for sock in socks:
        sock.send(request)
    while (now := time.perf_counter()) < end:
        ready = sel.select(min(1.0, end - now))
        if not ready:
            if now - last > LOAD_STALL:
                raise SystemExit(f"load: no answer on any of {conns} connections "
                                 f"for {LOAD_STALL:g} s")
            continue
        last = now
        for key, _ in ready:
            sock, buf = key.data
            if _answered(sock, buf, request):
                done += 1
                sock.send(request)
    elapsed = time.perf_counter() - t0
    for sock in socks:
        sock.close()
    print(f"{done} {elapsed:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="helper processes of the benchmark suite")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sink")
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("seconds", type=float)
    ld = sub.add_parser("load")
    ld.add_argument("host")
    ld.add_argument("port", type=int)
    ld.add_argument("conns", type=int)
    ld.add_argument("seconds", type=float)
    ld.add_argument("size", type=int)
    args = ap.parse_args()
    if args.cmd == "sink":
        _sink()
    elif args.cmd == "bulk":
        _bulk(args.host, args.port, args.seconds)
    else:
        try:
            _load(args.host, args.port, args.conns, args.seconds, args.size)
        except OSError as exc:  # a reset or refused connection: one line, not a traceback
            raise SystemExit(f"load: a connection failed: {exc.strerror or exc}") from None


if __name__ == "__main__":
    main()
