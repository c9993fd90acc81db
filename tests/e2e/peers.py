"""Drive real ``nopf`` / ``nopf-server`` processes inside a namespace lab."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.lab import Host, Lab
from tests.lab.topology import RDV_IP2
from tests.loopback import echo_service
from tests.programs import argv

RDV = "198.51.100.2:3012"
RDV_HOST = "rdv.lab"  # a name for the rendezvous host (``resolving`` makes it resolve)
RDV_NAME = f"{RDV_HOST}:3012"
SERVICE, TUNNEL = 3000, 3010  # the sharer's service port, the connector's tunnel port
SIZE = 2 << 20  # bytes ``round_trip`` sends through the tunnel, each way
DOCTOR_DELAY_MS = 10  # the NAT doctor's lab: each link's delay
DOCTOR_TARGET_MS = 1500  # what one doctor run may take at most


def start_rendezvous(lab: Lab, *extra: str) -> subprocess.Popen[bytes]:
    """The real ``nopf-server`` in the lab's rdv host (``extra``: its flags, e.g.
    ``--no-relay`` for the plans of a rendezvous without relay)."""
    proc = lab.rdv.popen(argv("nopf-server", *extra), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "listening on" in line, line
    return proc


def start_doctor_server(lab: Lab, *extra: str) -> subprocess.Popen[bytes]:
    """nopf-server on rdv (its doctor on 3013 and on the second address, which the lab needs:
    ``rdv_second_ip``); waits for it."""
    args = ["--doctor-address", RDV_IP2] if "--no-doctor" not in extra else []
    proc = lab.rdv.popen(argv("nopf-server", *args, *extra), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for _ in range(4):
        line = proc.stderr.readline().decode()
        if "NAT doctor on" in line or ("--no-doctor" in extra and "listening on" in line):
            return proc
    raise AssertionError(f"nopf-server did not start: {line}")


@dataclass
class Peer:
    """A running ``nopf``: stdout lines arrive on a queue, stderr goes to a temp file."""

    role: str
    host: Host
    proc: subprocess.Popen[bytes]
    err: IO[bytes]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def start(cls, host: Host, command: list[str], role: str, *,
              env: dict[str, str] | None = None, stdin: int = subprocess.DEVNULL) -> Peer:
        """``command`` running in ``host`` as the peer ``role``; its stderr goes to a
        temporary file that lives as long as the Peer (closed by GC)."""
        err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the Peer
        proc = host.popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=err, env=env)
        return cls(role, host, proc, err)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().rstrip("\n"))
        self.lines.put("")  # EOF marker

    def line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.role}: no stdout line within {timeout} s; "
                                 f"stderr: {self.stderr()}") from None

    def enter(self, address: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(address.encode() + b"\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return read_all(self.err)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def start_peer(host: Host, role: str, port: int, *extra: str, timeout: float = 15) -> Peer:
    return Peer.start(
        host, argv("nopf", "-t", role, "-p", str(port), "-a", RDV, "--timeout", str(timeout),
                   *extra), role, stdin=subprocess.PIPE)


def start_coordinated(host: Host, *args: str, rdv: str = RDV, timeout: float = 10,
                      keepalive: float | None = 2, extra: tuple[str, ...] = ()) -> Peer:
    """``nopf share|connect ...`` against the rendezvous ``rdv`` (the lab's), with short
    timeouts (``keepalive`` None: nopf's own)."""
    options = ["-a", rdv, "--timeout", f"{timeout:g}"]
    if keepalive is not None:
        options += ["--keepalive", f"{keepalive:g}"]
    return Peer.start(host, argv("nopf", *args, *options, *extra), args[0])


def read_all(err: IO[bytes]) -> str:
    """Everything a process wrote so far to its stderr file ``err``."""
    err.flush()
    err.seek(0)
    return err.read().decode(errors="replace")


def wait_on_stderr(who: str, proc: subprocess.Popen[bytes], err: IO[bytes], text: str,
                   timeout: float, count: int = 1) -> str:
    """``proc``'s stderr (file ``err``) once ``text`` is in it ``count`` times (fails,
    naming ``who``, if it exits first or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        written = read_all(err)
        if written.count(text) >= count:
            return written
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{who}: no {text!r} on stderr: {read_all(err)}")


def wait_for(peer: Peer, text: str, timeout: float = 25, count: int = 1) -> str:
    """``peer``'s stderr once ``text`` is in it ``count`` times (fails if it exits first)."""
    return wait_on_stderr(peer.role, peer.proc, peer.err, text, timeout, count)


@contextlib.contextmanager
def resolving(hosts: Sequence[Host], name: str, *ips: str) -> Iterator[None]:
    """``name`` resolves to ``ips`` inside ``hosts`` (their namespaces' /etc/netns/NS/hosts,
    which ``ip netns exec`` mounts over /etc/hosts), listed in this order."""
    made = []
    try:
        for host in hosts:
            etc = Path("/etc/netns") / host.ns
            etc.mkdir(parents=True, exist_ok=True)
            made.append(etc)
            (etc / "hosts").write_text("127.0.0.1 localhost\n"
                                       + "".join(f"{ip} {name}\n" for ip in ips))
        yield
    finally:
        for etc in made:
            shutil.rmtree(etc, ignore_errors=True)


@dataclass
class Pair:
    server: Peer
    client: Peer
    server_public: str
    client_public: str


def punch_pair(
    lab: Lab, *, server: Host | None = None, client: Host | None = None, order: str = "seed",
    gap: float = 1.0, server_port: int = 3000, client_port: int = 3010, timeout: float = 15,
    extra: tuple[str, ...] = (),
) -> Pair:
    """Start both peers, exchange addresses in ``order`` ("seed": server first)."""
    s = start_peer(server or lab.a1, "server", server_port, *extra, timeout=timeout)
    c = start_peer(client or lab.b1, "client", client_port, *extra, timeout=timeout)
    sp, cp = s.line(10), c.line(10)
    assert sp and cp, (s.stderr(), c.stderr())
    first, second = ((s, cp), (c, sp)) if order == "seed" else ((c, sp), (s, cp))
    first[0].enter(first[1])
    time.sleep(gap)
    second[0].enter(second[1])
    return Pair(s, c, sp, cp)


@contextlib.contextmanager
def listening(host: Host, port: int) -> Iterator[socket.socket]:
    with host.enter():
        lsock = socket.create_server(("127.0.0.1", port))
    try:
        yield lsock
    finally:
        lsock.close()


def connect(host: Host, port: int, timeout: float = 10, to: str = "127.0.0.1",
            ) -> socket.socket:
    """A connection from ``host`` to ``to:port`` (``host``'s own loopback by default)."""
    with host.enter():
        return socket.create_connection((to, port), timeout=timeout)


class Exchange:
    """Send ``size`` random bytes on ``sock`` while hashing everything received.

    ``then_close`` half-closes after sending; ``reply_after_eof`` sends the sha256
    of what was received only after the peer's EOF (proves the half-close path).
    """

    def __init__(self, sock: socket.socket, size: int, *, reply_after_eof: bool = False) -> None:
        self.sock = sock
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.received_bytes = 0
        self.tail = b""
        self.error: BaseException | None = None
        self._size = size
        self._reply_after_eof = reply_after_eof
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        try:
            left = self._size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                self.sent.update(chunk)
                self.sock.sendall(chunk)
                left -= len(chunk)
            if not self._reply_after_eof:
                self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _recv(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.received.update(data)
                self.received_bytes += len(data)
                self.tail = (self.tail + data)[-64:]
            if self._reply_after_eof:
                self._threads[0].join()
                self.sock.sendall(self.received.hexdigest().encode())
                self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise AssertionError(f"exchange still running after {timeout} s")
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def echo_service_on(host: Host, port: int = SERVICE, *, lan: bool = False) -> Iterator[None]:
    """``echo_service`` on ``port`` of ``host`` (its listener in the host's namespace; the
    caller's thread stays in its own), on loopback or, with ``lan``, on the host's LAN
    address; closed on exit."""
    with contextlib.ExitStack() as service:
        with host.enter():
            service.enter_context(echo_service(port, host.ip if lan else "127.0.0.1"))
        yield


def round_trip(host: Host, size: int = SIZE) -> None:
    """``size`` random bytes through the tunnel (port TUNNEL of ``host``) and back, intact."""
    data = os.urandom(size)
    sock = connect(host, TUNNEL, timeout=30)
    with sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        got = hashlib.sha256()
        left = size
        while left:
            chunk = sock.recv(min(left, 1 << 16))
            assert chunk, f"the tunnel closed after {size - left} bytes"
            got.update(chunk)
            left -= len(chunk)
        sender.join(30)
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()


def echo_once(host: Host, port: int, to: str = "127.0.0.1") -> None:
    """A new connection from ``host`` through the tunnel (at ``to:port``, ``host``'s own
    loopback by default): what it sends comes back."""
    sock = connect(host, port, timeout=10, to=to)
    with sock:
        sock.sendall(b"a new connection")
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(64):  # until the service's own close came back
            got += chunk
    assert got == b"a new connection"


def stop(*peers: Peer, sig: signal.Signals = signal.SIGINT,
         timeout: float = 10) -> tuple[int, ...]:
    """Signal every peer at once (a peer that saw the other close first may be ending by
    itself: both ways end with 0); their exit codes."""
    for peer in peers:
        peer.proc.send_signal(sig)
    return tuple(peer.wait(timeout) for peer in peers)


def close(*peers: Peer) -> None:
    """SIGINT every peer: each must exit with 0 and without a traceback."""
    codes = stop(*peers, timeout=15)
    assert codes == (0,) * len(peers), [p.stderr() for p in peers]
    for peer in peers:
        assert "Traceback" not in peer.stderr(), f"{peer.role}:\n{peer.stderr()}"


def path_lines(peer: Peer) -> str:
    """What the peer said about its paths (for the test's output)."""
    keys = ("was lost", "resum", "direct", "new connection")
    return "\n".join(f"  {peer.role}: {line}" for line in peer.stderr().splitlines()
                     if any(k in line for k in keys))


@contextlib.contextmanager
def named_pair(lab: Lab, *ips: str, connector_rdv: str = RDV_NAME, rendezvous: bool = True,
               ) -> Iterator[tuple[Peer, Peer]]:
    """``rdv.lab`` resolving to ``ips`` on every host, the rendezvous (``rendezvous``
    False: the caller's already runs), an echo service on a1, and a sharer (a1) and a
    connector (b1) given that name (the connector: ``connector_rdv``), each with its
    encrypted tunnel up; both stopped at the end, and both must exit with 0."""
    with resolving(list(lab.hosts.values()), RDV_HOST, *ips):
        if rendezvous:
            start_rendezvous(lab)
        s = start_coordinated(lab.a1, "share", "-p", str(SERVICE), rdv=RDV_NAME)
        with echo_service_on(lab.a1):
            code = s.line(10)
            c = start_coordinated(lab.b1, "connect", code, "-p", str(TUNNEL),
                                  rdv=connector_rdv)
            try:
                for peer in (s, c):
                    wait_for(peer, "encrypted tunnel to")
                yield s, c
            finally:
                codes = (stop(s)[0], c.wait(10))
    assert codes == (0, 0), (s.stderr(), c.stderr())


def drop_ipv6(host: Host) -> None:
    """``host`` keeps IPv4 only: no global IPv6 address, no IPv6 route."""
    host.run(["ip", "-6", "route", "flush", "default"])
    host.run(["ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global"])
