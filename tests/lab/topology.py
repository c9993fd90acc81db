"""A small routed "internet" in Linux network namespaces, for hole-punching tests.

Topology (one lab; every namespace is ``f"{prefix}-{role}"``)::

                         rdv 198.51.100.2/24 (eth0)
                                   |
                         (to-rdv) 198.51.100.1
    nata (wan) 203.0.113.2 --- 203.0.113.1 (to-a) [inet] (to-b) 192.0.2.1 --- 192.0.2.2 (wan) natb
    bridge "lan" 10.0.1.1/24                                            bridge "lan" 10.0.2.1/24
      |-- (to-a1) a1 10.0.1.2 (eth0)                                      |-- (to-b1) b1 10.0.2.2
      `-- (to-a2) a2 10.0.1.3 (eth0)                                      `-- (to-b2) b2 10.0.2.3

* ``inet`` is the only internet router and holds no route to private space:
  a packet leaving a1 with TTL 2 is forwarded by nata (TTL 1) and dies in
  ``inet`` (ICMP time exceeded) before reaching natb.
* The site LANs are Linux bridges inside the NAT namespaces, with bridge
  netfilter turned off there (``net.bridge.bridge-nf-call-*=0``), so a1<->a2
  is plain L2.
* NAT modes (per site): ``drop``, ``rst``, ``icmp`` (endpoint-independent
  ``masquerade``; unsolicited inbound dropped / TCP-reset / ICMP
  admin-prohibited), ``symmetric`` (``masquerade random,fully-random``,
  dropped) and ``none`` (no NAT, no filter; the LAN is then the public
  100.64.1.0/24 / 100.64.2.0/24 with routes in ``inet``).
* ``hairpin=("a",)``: that site's NAT also hairpins (a LAN host reaches a
  mapping of its own NAT through the public address), with a dynamic nft map
  of the mappings made; ``rdv_second_ip=True``: rdv also has 198.51.100.3.
* Disturbances (:meth:`Lab.rebind`, :meth:`Lab.block_direct`): a NAT that
  forgets its mappings and moves to other public ports (a NAT reboot, a new
  address), and a direct path between the sites that is cut while the
  rendezvous stays reachable; :meth:`Lab.tcp_counter` counts a host's traffic
  on one TCP port (nft counters).
* Optional delay/jitter/loss on every packet *forwarded* by ``inet``
  (see :mod:`tests.lab.delayer`): a round trip between sites or to rdv
  crosses ``inet`` twice, so RTT ~= 2 x delay.
* IPv6 is disabled in every namespace (no stray RS/MLD/DAD traffic).

Use::

    with Lab(left="drop", right="rst", delay_ms=20) as lab:
        lab.rdv.popen(["python3", "-m", "http.server", "8000"])
        lab.a1.run(["python3", "-c", "import urllib.request as u; "
                    "u.urlopen('http://198.51.100.2:8000/')"])
        with lab.a1.enter():          # this thread is now in a1's netns
            sock = socket.create_connection(("198.51.100.2", 8000))

Only the standard library is used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "MODES",
    "REBIND_KEYS",
    "Host",
    "Lab",
    "LabError",
    "Nat",
    "Site",
    "TcpCounter",
    "cleanup_prefix",
    "cleanup_stale",
    "lab_unavailable_reason",
    "list_labs",
]

T = TypeVar("T")

MODES: tuple[str, ...] = ("drop", "rst", "icmp", "symmetric", "none")
ROLES: tuple[str, ...] = ("inet", "rdv", "nata", "natb", "a1", "a2", "b1", "b2")
NETNS_DIR = Path("/var/run/netns")
STATE_DIR = Path("/run/nopf-lab")
AUTO_PREFIX_RE = re.compile(r"^nl[0-9a-f]{6}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,23}$")
NFQUEUE_NUM = 0
DELAYER_PATH = Path(__file__).with_name("delayer.py")
CLONE_NEWNET = 0x40000000

RDV_IP = "198.51.100.2"
RDV_IP2 = "198.51.100.3"  # rdv's second address, with Lab(rdv_second_ip=True)
INET_RDV_IP = "198.51.100.1"
WAN = {"a": ("203.0.113.2", "203.0.113.1"), "b": ("192.0.2.2", "192.0.2.1")}
PRIVATE_LAN = {"a": "10.0.1", "b": "10.0.2"}
# What a rebound NAT does to source ports (Lab.rebind alternates): public port = local
# port XOR key. Linux keeps a connection's source port when it may; a NAT told to map
# into a port range picks a random port per connection for every port outside it
# (mapping by destination: a symmetric NAT). A fixed function of the source port keeps
# the NAT endpoint-independent (punchable) and gives every connection a new port.
REBIND_KEYS: tuple[int, ...] = (0x2000, 0x4000)
NETLINK_NETFILTER = 12
_CTNETLINK_FLUSH = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
PUBLIC_LAN = {"a": "100.64.1", "b": "100.64.2"}
# Lab(ipv6=True): global IPv6 (the documentation prefix) everywhere, no NAT: each site a
# /64 behind its router's stateful firewall (the site's mode says how it refuses).
RDV_IP6 = "2001:db8:100::2"
INET_RDV_IP6 = "2001:db8:100::1"
WAN6 = {"a": ("2001:db8:a0::2", "2001:db8:a0::1"), "b": ("2001:db8:b0::2", "2001:db8:b0::1")}
LAN6 = {"a": "2001:db8:a::", "b": "2001:db8:b::"}  # /64; router ::1, hosts ::2, ::3


class LabError(RuntimeError):
    """The lab cannot be built or used (not root, missing tool, bad argument...)."""


# --------------------------------------------------------------------------- netns plumbing

# None off Unix: importing the lab (tests/conftest.py does) must work on Windows too.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform != "win32" else None


def _setns(fd: int) -> None:
    if _libc is None or _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _in_netns(ns: str) -> Iterator[None]:
    """Switch the calling *thread* into network namespace ``ns``, then back."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)


def _netns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def _run(argv: list[str], stdin: str | None = None, timeout: float = 20.0) -> None:
    """Run a setup command; raise LabError with its stderr if it fails."""
    proc = subprocess.run(
        argv,
        input=stdin.encode() if stdin is not None else None,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise LabError(f"{' '.join(argv[:4])}... failed: {detail}")


def _write_sysctl(name: str, value: str, *, optional: bool = False) -> None:
    """Write a sysctl of the calling thread's network namespace."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pids_in(namespaces: list[str]) -> list[int]:
    """Pids of processes (other than this one) whose network namespace is one of these."""
    wanted: set[tuple[int, int]] = set()
    for ns in namespaces:
        try:
            st = os.stat(NETNS_DIR / ns)
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    pids: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry))
    return pids


def _stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 2.0) -> None:
    """Terminate tracked processes by pid, SIGKILL whatever is left after ``grace`` s."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in alive:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
    for proc in procs:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def lab_unavailable_reason(*, need_iptables: bool = False) -> str | None:
    """Why labs cannot be built here (None if they can): root, ``ip netns``, ``nft``."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", *(("iptables",) if need_iptables else ())):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` in PATH"
    if not Path("/proc/thread-self/ns/net").exists():
        return "no network namespace support (/proc/thread-self/ns/net missing)"
    try:
        proc = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` failed: {exc}"
    if proc.returncode != 0:
        return f"`ip netns list` failed: {proc.stderr.decode(errors='replace').strip()}"
    return None


# --------------------------------------------------------------------------- hosts and sites


class Host:
    """One network namespace of a lab, seen as a host."""

    def __init__(
        self, name: str, ns: str, ip: str, procs: list[subprocess.Popen[bytes]] | None = None
    ) -> None:
        self.name = name
        self.ns = ns
        self.ip = ip
        self.ip6: str | None = None  # its global IPv6 address, with Lab(ipv6=True)
        self._procs: list[subprocess.Popen[bytes]] = procs if procs is not None else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    def command(self, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace; the lab stops it (by pid) at teardown.

        ``ip netns exec`` execs the program, so ``Popen.pid`` is the program's pid.
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(
        self, argv: list[str], timeout: float = 30, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the namespace and wait for it.

        stdout and stderr are captured unless given in ``kw``; ``check`` raises
        :class:`subprocess.CalledProcessError` on a non-zero exit.
        """
        if "stdout" not in kw and "stderr" not in kw and "capture_output" not in kw:
            kw["capture_output"] = True
        result: subprocess.CompletedProcess[bytes] = subprocess.run(
            self.command(argv), timeout=timeout, check=check, **kw
        )
        return result

    @contextlib.contextmanager
    def enter(self) -> Iterator[Host]:
        """Switch the calling *thread* into this namespace (``setns(CLONE_NEWNET)``).

        Sockets created inside the block live in the namespace (and stay there
        after the block); other threads are unaffected; the thread's original
        namespace is restored on exit. Threads and child processes started
        inside the block inherit the namespace.
        """
        with _in_netns(self.ns):
            yield self

    def listener(self, port: int = 0, *, share: bool = False, timeout: float = 5.0,
                 family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """A TCP listener on all of this host's addresses of ``family``, living in its
        namespace (``share``: SO_REUSEPORT too, so that connections can be made from its
        port); accept waits ``timeout`` s at most."""
        with self.enter():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(16)
        sock.settimeout(timeout)
        return sock

    def attempt(self, addr: tuple[str, int], timeout: float = 0.6, *, send: bytes = b"") -> str:
        """A TCP connect from this host to ``addr`` (then ``send``, if given): "ok",
        "timeout" or the errno name (ECONNREFUSED, EHOSTUNREACH...)."""
        with self.enter():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
            if send:
                sock.sendall(send)
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        finally:
            sock.close()
        return "ok"

    def run_async(self, main: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run ``main()`` in an event loop of a thread inside this namespace; its
        result, or its exception, in the calling thread."""
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                with self.enter():
                    result.append(asyncio.run(main()))  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the calling thread
                error.append(exc)

        thread = threading.Thread(target=target, name=f"lab-run-{self.name}")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{getattr(main, '__qualname__', main)} in {self.name} "
                               f"still runs after {timeout} s")
        if error:
            raise error[0]
        return result[0]


class Nat(Host):
    """The NAT (or plain router, mode ``none``) of a site. ``ip`` is its WAN address."""

    def __init__(
        self,
        name: str,
        ns: str,
        wan_ip: str,
        lan_ip: str,
        procs: list[subprocess.Popen[bytes]] | None = None,
    ) -> None:
        super().__init__(name, ns, wan_ip, procs)
        self.wan_ip = wan_ip
        self.lan_ip = lan_ip


@dataclass
class Site:
    """One site: its NAT and the hosts on its LAN."""

    name: str  # "a" or "b"
    mode: str
    nat: Nat
    hosts: list[Host] = field(default_factory=list)
    lan: str = ""  # e.g. "10.0.1.0/24"
    hairpin: bool = False  # the NAT hairpins (see Lab's ``hairpin``)
    rebind_key: int = 0  # after a rebind: public port = local port XOR this

    @property
    def public_ip(self) -> str:
        """The NAT's WAN address (the source address peers see in NAT modes)."""
        return self.nat.wan_ip

    @property
    def natted(self) -> bool:
        return self.mode != "none"


# --------------------------------------------------------------------------- nftables


# Hairpinning (tcp only): every new outgoing connection's mapping is recorded, public
# port -> private address and port, in a dynamic map (after NAT, where the reply tuple
# holds the public port); a SYN from the LAN to the WAN address and a recorded port is
# sent to that host, its source rewritten to the WAN address, as RFC 5382 REQ-8 asks.
_HAIRPIN = """
\tmap hairpin {{
\t\ttype inet_service : ipv4_addr . inet_service
\t\tflags dynamic,timeout
\t\ttimeout 10m
\t}}
\tchain hairpin_record {{
\t\ttype filter hook postrouting priority srcnat + 10; policy accept;
\t\toifname "wan" ct state new meta l4proto tcp \\
\t\t\tupdate @hairpin {{ ct reply proto-dst : ct original ip saddr . ct original proto-src }}
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "lan" ip daddr {wan} meta l4proto tcp dnat ip addr . port to tcp dport map @hairpin
\t}}"""


def _postrouting_rules(mode: str, hairpin: bool, wan_ip: str, key: int = 0) -> list[str]:
    """The NAT's source-NAT rules: masquerade on "wan" (``key``, after a rebind: TCP
    and UDP leave from local port XOR key), and the hairpin's snat."""
    flags = " random,fully-random" if mode == "symmetric" else ""
    rules = []
    if key and mode != "symmetric":  # a symmetric NAT picks new random ports anyway
        rules += [f'oifname "wan" meta l4proto {proto} snat ip to {wan_ip} : '
                  f"{proto} sport ^ {key:#x}" for proto in ("tcp", "udp")]
    rules.append(f'oifname "wan" masquerade{flags}')
    if hairpin:
        rules.append(f'iifname "lan" oifname "lan" ct status dnat snat ip to {wan_ip}')
    return rules


def _flush_conntrack() -> int:
    """Delete every connection-tracking entry of the calling thread's network namespace
    (ctnetlink, as ``conntrack -F`` does); 0 or the kernel's errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as nl:
        nl.bind((0, 0))
        nl.settimeout(5)
        # nlmsghdr (len, type, flags REQUEST|ACK, seq, pid), then nfgenmsg (family,
        # version 0, resource id 0, big-endian): no attributes = every entry.
        nl.send(struct.pack("=IHHII", 20, _CTNETLINK_FLUSH, 1 | 4, 1, 0)
                + struct.pack("!BBH", socket.AF_INET, 0, 0))
        reply = nl.recv(4096)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind != 2:  # NLMSG_ERROR carries the ack (error 0)
        return -1
    (error,) = struct.unpack_from("=i", reply, 16)
    return -int(error)


def _unsolicited(mode: str, icmp: str) -> str:
    """What a site's router does with an unsolicited inbound packet, as its ``mode`` says:
    a TCP reset, ICMP (``icmp``: "icmp" or "icmpv6") administratively prohibited, or
    dropped."""
    if mode == "rst":
        return "meta l4proto tcp reject with tcp reset\n\t\tdrop"
    if mode == "icmp":
        return f"reject with {icmp} type admin-prohibited"
    return "drop"


def _input_chain(unsolicited: str, *, also_accept: str = "") -> str:
    """A site router's own input: from its LAN side, replies (and ``also_accept``, an
    nft match) pass; anything else coming in from the WAN is ``unsolicited``."""
    also = f"\n\t\t{also_accept} accept" if also_accept else ""
    return f"""
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname != "wan" accept
\t\tct state established,related accept{also}
\t\tct state invalid drop
\t\t{unsolicited}
\t}}"""


def _nat_ruleset(mode: str, *, hairpin: bool = False, wan_ip: str = "") -> str:
    """The nftables ruleset of a NAT namespace (WAN = "wan", LAN bridge = "lan").

    ``hairpin``: a host of the LAN reaches another (or itself) through the NAT's
    public address and a port mapped for it (``wan_ip`` is that address).
    """
    if mode == "none":
        return ""  # plain router: no NAT, no filter
    unsolicited = _unsolicited(mode, "icmp")
    extra = _HAIRPIN.format(wan=wan_ip) if hairpin else ""
    postrouting = "".join(f"\n\t\t{rule}" for rule in _postrouting_rules(mode, hairpin, wan_ip))
    hairpin_forward = ('\n\t\tiifname "lan" oifname "lan" ct status dnat accept'
                       if hairpin else "")
    return f"""
table ip nopf_lab {{{extra}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;{postrouting}
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tiifname "lan" oifname "wan" accept{hairpin_forward}
\t\tiifname "wan" ct state new {unsolicited}
\t}}{_input_chain(unsolicited)}
}}
"""


def _firewall6_ruleset(mode: str) -> str:
    """The IPv6 stateful firewall of a site's router (no NAT: global addresses behind
    it): outbound opens, replies pass, unsolicited inbound is dropped, or refused with
    a TCP reset or ICMPv6 administratively prohibited, as the site's ``mode`` says
    (``symmetric``: dropped). Named counter ``forwarded``: every forwarded packet."""
    if mode == "none":
        return """
table ip6 nopf_lab6 {
\tcounter forwarded {
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tcounter name "forwarded"
\t}
}
"""
    unsolicited = _unsolicited(mode, "icmpv6")
    return f"""
table ip6 nopf_lab6 {{
\tcounter forwarded {{
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tcounter name "forwarded"
\t\tct state established,related accept
\t\tct state invalid drop
\t\tiifname "lan" oifname "wan" accept
\t\ticmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded,
\t\t\tparameter-problem }} accept
\t\tiifname "wan" ct state new {unsolicited}
\t}}{_input_chain(unsolicited, also_accept="meta l4proto ipv6-icmp")}
}}
"""


# The direct path between the sites, cut in ``inet`` (before its other rules).
_BLOCK_DIRECT = """
table ip nopf_block {
\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tiifname "to-a" oifname "to-b" drop
\t\tiifname "to-b" oifname "to-a" drop
\t}
}
"""


class TcpCounter:
    """Packets and bytes of one host's TCP traffic on one port, both directions, IPv4
    and IPv6 (nft named counters in a table of its own, ``inet nopf_count_PORT``)."""

    def __init__(self, host: Host, port: int) -> None:
        self.host = host
        self.port = port
        self.table = f"nopf_count_{port}"
        _run(host.command(["nft", "-f", "-"]), f"""
table inet {self.table} {{
\tcounter seen {{
\t}}
\tchain input {{
\t\ttype filter hook input priority raw; policy accept;
\t\ttcp dport {port} counter name "seen"
\t\ttcp sport {port} counter name "seen"
\t}}
\tchain output {{
\t\ttype filter hook output priority raw; policy accept;
\t\ttcp sport {port} counter name "seen"
\t\ttcp dport {port} counter name "seen"
\t}}
}}
""")

    def read(self) -> tuple[int, int]:
        """(packets, bytes) so far."""
        out = self.host.run(["nft", "-j", "list", "counter", "inet", self.table, "seen"])
        for item in json.loads(out.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"]), int(item["counter"]["bytes"])
        raise LabError(f"no counter in {self.table}")

    def close(self) -> None:
        self.host.run(["nft", "delete", "table", "inet", self.table], check=False)


# --------------------------------------------------------------------------- the lab

_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _down_all_at_exit() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        if not lab.persist:
            with contextlib.suppress(Exception):
                lab.down()


def _new_prefix() -> str:
    while True:
        prefix = "nl" + secrets.token_hex(3)
        if (
            not any(_netns_exists(f"{prefix}-{role}") for role in ROLES)
            and not (STATE_DIR / f"{prefix}.pid").exists()
        ):
            return prefix


class Lab:
    """A simulated internet: router ``inet``, rendezvous ``rdv``, sites ``a`` and ``b``.

    ``left``/``right`` choose the NAT mode of site a / site b (see :data:`MODES`).
    ``delay_ms``/``jitter_ms``/``loss`` apply to every packet forwarded by
    ``inet`` (uniform jitter, loss probability 0..1). ``persist=True`` keeps the
    lab (and its delayer) alive after this process exits (CLI ``--detach``):
    it is then skipped by the atexit hook and :func:`cleanup_stale`.

    ICMP errors sent by the routers (the ``icmp`` NAT mode's admin-prohibited,
    TTL exceeded, net unreachable) are rate-limited as on any Linux router:
    per destination a burst of 6, then one per second. ``icmp_ratelimit=False``
    sets ``net.ipv4.icmp_ratemask=0`` in ``inet`` and the NATs so that every
    such packet is answered.

    ``hairpin`` names the sites ("a", "b") whose NAT hairpins: a LAN host's
    connection to the NAT's public address and a port mapped for a LAN host
    reaches that host (as RFC 5382 asks; plain Linux masquerading does not).
    ``rdv_second_ip=True`` gives ``rdv`` a second address, :data:`RDV_IP2`
    (``lab.rdv_ips`` lists them). ``ipv6_only`` (with ``ipv6=True``) names the sites
    whose hosts have no IPv4 at all (no address but loopback's, no route): their
    router still has its IPv4 WAN, but nothing of theirs uses it.
    """

    def __init__(
        self,
        left: str = "drop",
        right: str = "drop",
        *,
        prefix: str | None = None,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss: float = 0.0,
        persist: bool = False,
        icmp_ratelimit: bool = True,
        hairpin: tuple[str, ...] | frozenset[str] | list[str] = (),
        rdv_second_ip: bool = False,
        ipv6: bool = False,
        ipv6_only: tuple[str, ...] | list[str] = (),
    ) -> None:
        for mode in (left, right):
            if mode not in MODES:
                raise LabError(f"unknown NAT mode {mode!r} (choose from {', '.join(MODES)})")
        for side in hairpin:
            if side not in ("a", "b"):
                raise LabError(f"hairpin names sites a or b, not {side!r}")
            if (left if side == "a" else right) == "none":
                raise LabError(f"site {side} has no NAT (mode none): nothing to hairpin")
        for side in ipv6_only:
            if side not in ("a", "b") or not ipv6:
                raise LabError(f"ipv6_only names sites a or b of a lab with ipv6=True, "
                               f"not {side!r}")
        if prefix is not None and not PREFIX_RE.match(prefix):
            raise LabError(f"bad prefix {prefix!r}: 1-24 characters of [A-Za-z0-9_]")
        if delay_ms < 0 or jitter_ms < 0:
            raise LabError("delay_ms and jitter_ms must be >= 0")
        if not 0.0 <= loss <= 1.0:
            raise LabError("loss must be a probability between 0 and 1")
        self.prefix = prefix if prefix is not None else _new_prefix()
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.loss = float(loss)
        self.persist = persist
        self.icmp_ratelimit = icmp_ratelimit
        self.rdv_second_ip = rdv_second_ip
        self.ipv6 = ipv6
        self.ipv6_only = frozenset(ipv6_only)
        self.build_seconds: float | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._delayer: subprocess.Popen[bytes] | None = None
        self._started = False
        self._is_up = False
        self._lock = threading.Lock()
        self._direct_blocked = False

        def ns(role: str) -> str:
            return f"{self.prefix}-{role}"

        self.inet = Host("inet", ns("inet"), INET_RDV_IP, self._procs)
        self.rdv = Host("rdv", ns("rdv"), RDV_IP, self._procs)
        sites: dict[str, Site] = {}
        for side, mode in (("a", left), ("b", right)):
            net = PRIVATE_LAN[side] if mode != "none" else PUBLIC_LAN[side]
            wan_ip, _ = WAN[side]
            nat = Nat(f"nat{side}", ns(f"nat{side}"), wan_ip, f"{net}.1", self._procs)
            hosts = [
                Host(f"{side}{i}", ns(f"{side}{i}"), f"{net}.{i + 1}", self._procs) for i in (1, 2)
            ]
            sites[side] = Site(side, mode, nat, hosts, f"{net}.0/24", side in hairpin)
        self.a = sites["a"]
        self.b = sites["b"]
        self.a1, self.a2 = self.a.hosts
        self.b1, self.b2 = self.b.hosts
        if ipv6:
            self.rdv.ip6 = RDV_IP6
            for site in (self.a, self.b):
                site.nat.ip6 = WAN6[site.name][0]
                for i, host in enumerate(site.hosts):
                    host.ip6 = f"{LAN6[site.name]}{i + 2}"

    # ------------------------------------------------------------------ introspection

    @property
    def hosts(self) -> dict[str, Host]:
        """Every namespace of the lab by role."""
        return {
            "inet": self.inet,
            "rdv": self.rdv,
            "nata": self.a.nat,
            "natb": self.b.nat,
            "a1": self.a1,
            "a2": self.a2,
            "b1": self.b1,
            "b2": self.b2,
        }

    @property
    def rdv_ips(self) -> list[str]:
        """The rendezvous host's addresses (two with ``rdv_second_ip``)."""
        return [RDV_IP, RDV_IP2] if self.rdv_second_ip else [RDV_IP]

    @property
    def nata(self) -> Nat:
        return self.a.nat

    @property
    def natb(self) -> Nat:
        return self.b.nat

    @property
    def namespaces(self) -> list[str]:
        return [f"{self.prefix}-{role}" for role in ROLES]

    @property
    def is_up(self) -> bool:
        return self._is_up

    @property
    def delayer(self) -> subprocess.Popen[bytes] | None:
        """The delayer process in ``inet`` (None without delay/jitter/loss)."""
        return self._delayer

    @property
    def tracked_processes(self) -> list[subprocess.Popen[bytes]]:
        procs = list(self._procs)
        if self._delayer is not None:
            procs.append(self._delayer)
        return procs

    def site(self, name: str) -> Site:
        return {"a": self.a, "b": self.b}[name]

    def __repr__(self) -> str:
        hairpin = tuple(s.name for s in (self.a, self.b) if s.hairpin)
        return (
            f"Lab(left={self.a.mode!r}, right={self.b.mode!r}, prefix={self.prefix!r}, "
            f"delay_ms={self.delay_ms}, jitter_ms={self.jitter_ms}, loss={self.loss}"
            + (f", hairpin={hairpin!r}" if hairpin else "")
            + (", rdv_second_ip=True" if self.rdv_second_ip else "") + ")"
        )

    def describe(self) -> str:
        """A human-readable table of namespaces and addresses."""
        rows = [("role", "namespace", "address(es)", "notes")]
        rows.append(("inet", self.inet.ns, "198.51.100.1 203.0.113.1 192.0.2.1", self._inet_note()))
        rows.append(("rdv", self.rdv.ns, " ".join(self.rdv_ips), "rendezvous host"))
        for site in (self.a, self.b):
            nat = site.nat
            mode = f"mode {site.mode}" + (", hairpin" if site.hairpin else "")
            rows.append((nat.name, nat.ns, f"{nat.wan_ip} (wan) {nat.lan_ip} (lan)", mode))
            for host in site.hosts:
                rows.append(
                    (
                        host.name,
                        host.ns,
                        host.ip,
                        f"behind {nat.name}" if site.natted else "public, no NAT",
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
        )

    def _inet_note(self) -> str:
        if not (self.delay_ms or self.jitter_ms or self.loss):
            return "internet router"
        return (
            f"internet router, delay {self.delay_ms:g}±{self.jitter_ms:g} ms, "
            f"loss {self.loss:g} per pass"
        )

    # ------------------------------------------------------------------ disturbances

    def rebind(self, site: str) -> int:
        """Site ``site``'s NAT forgets every mapping and maps to new public ports, as a
        NAT reboot or a new address would: its connection tracking is flushed (as
        ``conntrack -F`` does, here over ctnetlink) and from now on a connection
        from local port P leaves from public port P XOR key (the next of
        :data:`REBIND_KEYS`, never the key in force; a symmetric NAT keeps picking
        random ports). Connections through it break: their next packets leave
        from a public port the far end has never seen, and the far end's packets
        to the old port find no mapping (the NAT's mode decides: dropped, TCP
        reset, ICMP). New connections work, and the NAT stays endpoint-independent
        (punchable). Returns the key now in force."""
        where = self.site(site)
        if not where.natted:
            raise LabError(f"site {site} has no NAT (mode none): nothing to rebind")
        key = next(k for k in REBIND_KEYS if k != where.rebind_key)
        rules = _postrouting_rules(where.mode, where.hairpin, where.nat.wan_ip, key)
        batch = "flush chain ip nopf_lab postrouting\n" + "".join(
            f"add rule ip nopf_lab postrouting {rule}\n" for rule in rules)
        _run(where.nat.command(["nft", "-f", "-"]), batch)
        with _in_netns(where.nat.ns):
            error = _flush_conntrack()
        if error:
            raise LabError(f"flushing {where.nat.name}'s connection tracking failed: "
                           f"{os.strerror(error) if error > 0 else 'no ack'}")
        where.rebind_key = key
        return key

    def block_direct(self) -> None:
        """Cut the direct path between the sites: ``inet`` drops whatever it would
        forward from one site to the other (silently, as a broken link). Both
        sites still reach the rendezvous. Idempotent."""
        if self._direct_blocked:
            return
        _run(self.inet.command(["nft", "-f", "-"]), _BLOCK_DIRECT)
        self._direct_blocked = True

    def unblock_direct(self) -> None:
        """Undo :meth:`block_direct` (idempotent)."""
        if not self._direct_blocked:
            return
        _run(self.inet.command(["nft", "delete", "table", "ip", "nopf_block"]))
        self._direct_blocked = False

    @property
    def direct_blocked(self) -> bool:
        return self._direct_blocked

    def tcp_counter(self, host: Host, port: int) -> TcpCounter:
        """Count the TCP traffic of ``host`` on ``port`` (either end), from now on."""
        return TcpCounter(host, port)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the lab (idempotent). Raises LabError and cleans up on failure."""
        with self._lock:
            if self._is_up:
                return self
            if self._started:
                raise LabError(f"lab {self.prefix} was already torn down; make a new Lab")
            reason = lab_unavailable_reason(
                need_iptables=bool(self.delay_ms or self.jitter_ms or self.loss)
            )
            if reason:
                raise LabError(reason)
            for role_ns in self.namespaces:
                if _netns_exists(role_ns):
                    raise LabError(f"namespace {role_ns} already exists (prefix in use?)")
            self._started = True
            _register(self)
            start = time.monotonic()
            try:
                self._write_state()
                self._build()
            except BaseException:
                self._teardown()
                raise
            self.build_seconds = time.monotonic() - start
            self._is_up = True
            return self

    def down(self) -> None:
        """Tear the lab down (idempotent): processes, namespaces, state file."""
        with self._lock:
            if not self._started:
                return
            self._teardown()

    def _teardown(self) -> None:
        _stop_processes(self.tracked_processes)
        _kill_pids(_pids_in(self.namespaces))  # children of tracked processes
        _delete_namespaces(self.namespaces)
        for suffix in (".pid", ".delayer.log"):
            with contextlib.suppress(FileNotFoundError):
                (STATE_DIR / f"{self.prefix}{suffix}").unlink()
        self._is_up = False
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        state = {
            "pid": pid,
            "start": _proc_start_time(pid),
            "persist": self.persist,
            "left": self.a.mode,
            "right": self.b.mode,
        }
        path = STATE_DIR / f"{self.prefix}.pid"
        tmp = path.with_suffix(f".tmp{pid}")
        tmp.write_text(json.dumps(state) + "\n")
        tmp.rename(path)

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        p = self.prefix
        root = [f"netns add {ns}" for ns in self.namespaces]
        root += [
            f"link add to-rdv netns {p}-inet type veth peer name eth0 netns {p}-rdv",
            f"link add to-a netns {p}-inet type veth peer name wan netns {p}-nata",
            f"link add to-b netns {p}-inet type veth peer name wan netns {p}-natb",
        ]
        for side in ("a", "b"):
            for i in (1, 2):
                root.append(
                    f"link add to-{side}{i} netns {p}-nat{side} type veth "
                    f"peer name eth0 netns {p}-{side}{i}"
                )
        _run(["ip", "-batch", "-"], "\n".join(root) + "\n")

        for role in ROLES:
            with _in_netns(f"{p}-{role}"):
                if self.ipv6:
                    # Every interface too: the veths came in before "default" changed,
                    # and a tentative link-local address (DAD, about 2 s) leaves the
                    # first packets without a neighbour to go to.
                    confs = sorted(os.listdir("/proc/sys/net/ipv6/conf"))
                    for conf in dict.fromkeys(["all", "default", *confs]):
                        _write_sysctl(f"net.ipv6.conf.{conf}.disable_ipv6", "0")
                        _write_sysctl(f"net.ipv6.conf.{conf}.accept_dad", "0")
                        _write_sysctl(f"net.ipv6.conf.{conf}.accept_ra", "0")
                        _write_sysctl(f"net.ipv6.conf.{conf}.autoconf", "0")
                    if role in ("inet", "nata", "natb"):
                        _write_sysctl("net.ipv6.conf.all.forwarding", "1")
                else:
                    _write_sysctl("net.ipv6.conf.all.disable_ipv6", "1", optional=True)
                    _write_sysctl("net.ipv6.conf.default.disable_ipv6", "1", optional=True)
                if role in ("inet", "nata", "natb"):
                    _write_sysctl("net.ipv4.ip_forward", "1")
                    if not self.icmp_ratelimit:
                        _write_sysctl("net.ipv4.icmp_ratemask", "0")
                if role in ("nata", "natb"):
                    for fam in ("iptables", "ip6tables", "arptables"):
                        _write_sysctl(f"net.bridge.bridge-nf-call-{fam}", "0", optional=True)
                    if self.site(role[-1]).hairpin:
                        # A hairpinned packet leaves by the interface it came in on: no
                        # ICMP redirect ("lan" is made later and inherits default).
                        _write_sysctl("net.ipv4.conf.all.send_redirects", "0")
                        _write_sysctl("net.ipv4.conf.default.send_redirects", "0")

        batches: dict[str, list[str]] = {role: ["link set dev lo up"] for role in ROLES}
        inet = batches["inet"]
        inet += [
            f"addr add {INET_RDV_IP}/24 dev to-rdv",
            f"addr add {WAN['a'][1]}/24 dev to-a",
            f"addr add {WAN['b'][1]}/24 dev to-b",
            "link set dev to-rdv up",
            "link set dev to-a up",
            "link set dev to-b up",
        ]
        batches["rdv"] += [
            f"addr add {RDV_IP}/24 dev eth0",  # first: the primary, the source of rdv's SYNs
            "link set dev eth0 up",
            f"route add default via {INET_RDV_IP} dev eth0",
        ]
        if self.rdv_second_ip:
            batches["rdv"].append(f"addr add {RDV_IP2}/24 dev eth0")
        for site in (self.a, self.b):
            wan_ip, gw = WAN[site.name]
            if not site.natted:
                inet.append(f"route add {site.lan} via {wan_ip} dev to-{site.name}")
            nat = batches[site.nat.name]
            nat += [
                f"addr add {wan_ip}/24 dev wan",
                "link set dev wan up",
                f"route add default via {gw} dev wan",
                "link add name lan type bridge",
            ]
            for host in site.hosts:
                nat += [
                    f"link set dev to-{host.name} master lan",
                    f"link set dev to-{host.name} up",
                ]
                if site.name in self.ipv6_only:  # no IPv4 but loopback's
                    batches[host.name].append("link set dev eth0 up")
                    continue
                batches[host.name] += [
                    f"addr add {host.ip}/24 dev eth0",
                    "link set dev eth0 up",
                    f"route add default via {site.nat.lan_ip} dev eth0",
                ]
            nat += [f"addr add {site.nat.lan_ip}/24 dev lan", "link set dev lan up"]
        if self.ipv6:
            self._ipv6_batches(batches)

        procs = {
            role: subprocess.Popen(
                ["ip", "-n", f"{p}-{role}", "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for role in ROLES
        }
        errors = []
        for role, proc in procs.items():
            _, err = proc.communicate("\n".join(batches[role]).encode() + b"\n", timeout=20)
            if proc.returncode != 0:
                errors.append(f"{role}: {err.decode(errors='replace').strip()}")
        if errors:
            raise LabError("ip -batch failed: " + "; ".join(errors))

        for site in (self.a, self.b):
            ruleset = _nat_ruleset(site.mode, hairpin=site.hairpin, wan_ip=site.nat.wan_ip)
            if self.ipv6:
                ruleset += _firewall6_ruleset(site.mode)
            if ruleset:
                _run(["ip", "netns", "exec", site.nat.ns, "nft", "-f", "-"], ruleset)

        if self.delay_ms or self.jitter_ms or self.loss:
            self._start_delayer()

    def _ipv6_batches(self, batches: dict[str, list[str]]) -> None:
        """Global IPv6 everywhere (addresses without duplicate detection: usable at once),
        routed by ``inet``; each site a /64 behind its router."""
        batches["inet"].append(f"addr add {INET_RDV_IP6}/64 dev to-rdv nodad")
        batches["rdv"] += [f"addr add {RDV_IP6}/64 dev eth0 nodad",
                           f"route add ::/0 via {INET_RDV_IP6} dev eth0"]
        for site in (self.a, self.b):
            wan6, gw6 = WAN6[site.name]
            batches["inet"] += [f"addr add {gw6}/64 dev to-{site.name} nodad",
                                f"route add {LAN6[site.name]}/64 via {wan6} dev to-{site.name}"]
            batches[site.nat.name] += [f"addr add {wan6}/64 dev wan nodad",
                                       f"route add ::/0 via {gw6} dev wan",
                                       f"addr add {LAN6[site.name]}1/64 dev lan nodad"]
            for host in site.hosts:
                batches[host.name] += [f"addr add {host.ip6}/64 dev eth0 nodad",
                                       f"route add ::/0 via {LAN6[site.name]}1 dev eth0"]

    def forwarded6(self, site: str) -> int:
        """Bytes of IPv6 the site's router has forwarded so far (both directions)."""
        out = self.site(site).nat.run(["nft", "-j", "list", "counter", "ip6", "nopf_lab6",
                                       "forwarded"])
        for item in json.loads(out.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["bytes"])
        raise LabError("no IPv6 counter: build the lab with ipv6=True")

    def _start_delayer(self) -> None:
        argv = [
            sys.executable,
            "-I",
            str(DELAYER_PATH),
            "--queue",
            str(NFQUEUE_NUM),
            "--delay-ms",
            repr(self.delay_ms),
            "--jitter-ms",
            repr(self.jitter_ms),
            "--loss",
            repr(self.loss),
        ]
        if not self.persist:
            argv += ["--parent-pid", str(os.getpid()), "--watch-stdin"]
        stderr: int | IO[bytes] | None = None  # ours: it dies with us
        if self.persist:  # it outlives us: never hold our caller's pipes open
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            stderr = open(STATE_DIR / f"{self.prefix}.delayer.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                self.inet.command(argv),
                stdin=subprocess.DEVNULL if self.persist else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C of the terminal must not kill it first
            )
        finally:
            if stderr is not None and not isinstance(stderr, int):
                stderr.close()
        self._delayer = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise LabError(f"delayer did not start (exit code {proc.poll()})")
        proc.stdout.close()
        _run(
            self.inet.command(
                [
                    "iptables",
                    "-w",
                    "5",
                    "-t",
                    "mangle",
                    "-A",
                    "FORWARD",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    str(NFQUEUE_NUM),
                ]
            )
        )
        if self.ipv6:  # the same queue (the kernel ignores the family a queue binds)
            _run(self.inet.command(["ip6tables", "-w", "5", "-t", "mangle", "-A", "FORWARD",
                                    "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_NUM)]))


def _register(lab: Lab) -> None:
    global _ATEXIT_REGISTERED
    with _LIVE_LOCK:
        _LIVE.add(lab)
        if not _ATEXIT_REGISTERED:
            atexit.register(_down_all_at_exit)
            _ATEXIT_REGISTERED = True


def _delete_namespaces(namespaces: list[str]) -> None:
    existing = [ns for ns in namespaces if _netns_exists(ns)]
    if not existing:
        return
    # -force: carry on past a namespace that vanished meanwhile
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"netns del {ns}\n" for ns in existing).encode(),
        capture_output=True,
        timeout=20,
        check=False,
    )


# --------------------------------------------------------------------------- cleanup helpers


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove the lab ``prefix`` whoever owns it: kill the processes in its
    namespaces, delete the namespaces and its state file. Returns the deleted
    namespace names."""
    if not PREFIX_RE.match(prefix):
        raise LabError(f"bad prefix {prefix!r}")
    namespaces = [f"{prefix}-{role}" for role in ROLES]
    existing = [ns for ns in namespaces if _netns_exists(ns)]
    _kill_pids(_pids_in(existing))
    _delete_namespaces(existing)
    for suffix in (".pid", ".delayer.log"):
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{prefix}{suffix}").unlink()
    with _LIVE_LOCK:
        for lab in list(_LIVE):
            if lab.prefix == prefix:
                _LIVE.discard(lab)
    return existing


def _owner_alive(prefix: str) -> bool | None:
    """True/False whether the lab's owner lives; None for persistent (detached) labs."""
    try:
        state = json.loads((STATE_DIR / f"{prefix}.pid").read_text())
        pid = int(state["pid"])
        started = state.get("start")
        persist = bool(state.get("persist", False))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if persist:
        return None
    actual = _proc_start_time(pid)
    return actual is not None and (started is None or actual == started)


def list_labs() -> dict[str, list[str]]:
    """Prefixes of labs with namespaces present (any prefix), with their namespaces."""
    labs: dict[str, list[str]] = {}
    if not NETNS_DIR.is_dir():
        return labs
    roles = "|".join(ROLES)
    pattern = re.compile(rf"^(.+)-({roles})$")
    for name in sorted(os.listdir(NETNS_DIR)):
        m = pattern.match(name)
        if m and PREFIX_RE.match(m.group(1)):
            labs.setdefault(m.group(1), []).append(name)
    return labs


def cleanup_stale() -> list[str]:
    """Remove labs named ``nl[0-9a-f]{6}-*`` whose owner process is dead.

    Labs of live processes (even other test runs) and detached labs
    (``persist=True``) are left alone. Returns the prefixes removed.
    """
    removed: list[str] = []
    prefixes = {p for p in list_labs() if AUTO_PREFIX_RE.match(p)}
    if STATE_DIR.is_dir():
        prefixes |= {
            f.name[: -len(".pid")]
            for f in STATE_DIR.glob("nl*.pid")
            if AUTO_PREFIX_RE.match(f.name[: -len(".pid")])
        }
    for prefix in sorted(prefixes):
        if _owner_alive(prefix) is False:
            cleanup_prefix(prefix)
            removed.append(prefix)
    return removed
