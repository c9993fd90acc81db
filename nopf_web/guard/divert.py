"""Everything that touches pydivert, in one place.

pydivert gives one API over two backends: WinDivert on Windows (a signed
kernel driver, needs Administrator) and eBPFDivert on Linux (TC classifier
programs on every interface of the current network namespace, needs root or
CAP_BPF + CAP_NET_ADMIN + CAP_NET_RAW, kernel >= 5.10 with BTF). Both take the
same WinDivert filter language, so this module has a single code path:

- :func:`unavailable_reason` says why no handle can be opened here (None when
  one can), after really opening and closing one;
- :class:`Handle` is one open handle: the kernel diverts matching packets to
  it and they are gone unless :meth:`Handle.reinject` sends them on;
- :func:`compile_error` and :func:`filter_matches` run pydivert's own filter
  compiler and evaluator, which need no privileges (the unit tests use them).

On Linux a handle attaches to the interfaces of the network namespace of the
thread that opens it, so open it from a thread that lives there; closing
switches back to that namespace if needed (detaching goes by interface
index, which means nothing in another namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .filters import Segment

__all__ = [
    "Captured",
    "DivertError",
    "Handle",
    "HandleShutDown",
    "compile_error",
    "filter_matches",
    "unavailable_reason",
]

_SHUTDOWN_RECV = 1  # WinDivertShutdown / ebpfdivert_shutdown: stop receiving

# os.O_CLOEXEC is POSIX (only Linux opens anything with it here).
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# WinDivertOpen's documented failures (WinDivert 2.2 manual), as Windows error codes.
_WINDIVERT_ERRORS = {
    2: "the WinDivert driver file (WinDivert64.sys) is missing beside pydivert's WinDivert.dll",
    5: "the packet guard needs Administrator on Windows (to load the WinDivert driver)",
    577: "Windows rejected the WinDivert driver's signature (error 577, "
         "ERROR_INVALID_IMAGE_HASH: Secure Boot with an out-of-date Windows?)",
    654: "another program's incompatible WinDivert driver is loaded (error 654): stop that "
         "program or reboot",
    1060: "the WinDivert driver service is not installed (error 1060)",
    1275: "Windows blocked the WinDivert driver (error 1275, ERROR_DRIVER_BLOCKED: security "
          "software, Memory integrity, or a virtual machine without driver support)",
    1753: "the WinDivert driver needs the Base Filtering Engine service, which is disabled "
          "(error 1753)",
}
WITHOUT_GUARD = "running without it"

# Linux capability bits (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_NET_RAW = 13
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39


class DivertError(Exception):
    """A handle could not be opened or used; the message says why, for users."""


class HandleShutDown(Exception):
    """The handle was shut down (or closed) while receiving: the receive loop ends."""


@dataclass
class Captured:
    """One diverted packet: its TCP fields (None if not IPv4 TCP) and pydivert's packet."""

    segment: Segment | None
    packet: Any


def _pydivert() -> Any:
    import pydivert

    return pydivert


def _is_root() -> bool:
    if sys.platform == "win32":
        return False
    return os.geteuid() == 0


def _linux_privilege_problem() -> str | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            eff = next((int(line.split()[1], 16) for line in status
                        if line.startswith("CapEff:")), 0)
    except OSError:
        eff = -1 if _is_root() else 0  # no /proc: trust root
    names = {_CAP_NET_ADMIN: "CAP_NET_ADMIN", _CAP_NET_RAW: "CAP_NET_RAW"}
    missing = [name for bit, name in names.items() if not eff >> bit & 1]
    if not (eff >> _CAP_BPF & 1 or eff >> _CAP_SYS_ADMIN & 1):
        missing.insert(0, "CAP_BPF")
    if not missing:
        return None
    who = "running as root but without " if _is_root() else "not running as root: no "
    return (f"{who}{', '.join(missing)}; the packet guard needs root (or CAP_BPF, "
            "CAP_NET_ADMIN and CAP_NET_RAW) to load its eBPF filter")


def _windows_privilege_problem() -> str | None:
    windll = getattr(ctypes, "windll", None)
    try:
        admin = bool(windll.shell32.IsUserAnAdmin()) if windll is not None else False
    except OSError:
        admin = False
    if admin:
        return None
    return f"{_WINDIVERT_ERRORS[5]}: {WITHOUT_GUARD}"


def _privilege_problem() -> str | None:
    if sys.platform == "win32":
        return _windows_privilege_problem()
    if sys.platform.startswith("linux"):
        return _linux_privilege_problem()
    return (f"the packet guard has no backend on {sys.platform} (pydivert supports Linux and "
            f"Windows): {WITHOUT_GUARD}")


def unavailable_reason() -> str | None:
    """Why this process cannot guard packets (None if it can): checks, then a real open."""
    problem = _privilege_problem()
    if problem is not None:
        return problem
    try:
        pydivert = _pydivert()
    except ImportError as exc:
        return f"pydivert is not installed or cannot load its backend ({exc})"
    if sys.platform.startswith("linux") and not pydivert.Divert.is_registered():
        return "pydivert's Linux backend (libebpfdivert) could not be loaded"
    try:
        Handle("false").close()
    except DivertError as exc:
        return str(exc)
    return None


def compile_error(expr: str) -> str | None:
    """pydivert's compiler's complaint about ``expr`` (None if it compiles)."""
    ok, pos, message = _pydivert().Divert.check_filter(expr)
    if ok:
        return None
    return f"{message or 'invalid filter'} at position {int(pos)}"


def filter_matches(expr: str, raw: bytes, *, outbound: bool) -> bool:
    """Whether pydivert's own evaluator matches the IP packet ``raw`` against ``expr``."""
    pydivert = _pydivert()
    direction = pydivert.Direction.OUTBOUND if outbound else pydivert.Direction.INBOUND
    packet = pydivert.Packet(bytearray(raw), interface=(1, 0), direction=direction)
    return bool(packet.matches(expr))


def _segment(packet: Any) -> Segment | None:
    tcp = packet.tcp
    if tcp is None or packet.ipv4 is None:
        return None
    return Segment(
        src=str(packet.src_addr), src_port=int(packet.src_port),
        dst=str(packet.dst_addr), dst_port=int(packet.dst_port),
        outbound=bool(packet.is_outbound),
        syn=bool(tcp.syn), ack=bool(tcp.ack), fin=bool(tcp.fin), rst=bool(tcp.rst),
        tos=int(packet.ipv4.tos),
    )


def _describe_open_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    known = _WINDIVERT_ERRORS.get(getattr(exc, "winerror", None) or -1)
    if known is not None:  # Windows: WinDivertOpen's own reasons, in words
        return f"{known}: {WITHOUT_GUARD}"
    errno_ = getattr(exc, "errno", None)
    if isinstance(exc, PermissionError) or errno_ in (1, 13):
        return f"permission denied opening a pydivert handle ({text}); run as root/Administrator"
    if isinstance(exc, NotImplementedError):
        return f"this system cannot run pydivert's filter ({text})"
    return f"pydivert could not open a handle ({text})"


class _NetnsPin:
    """The network namespace a handle was opened in (Linux), to close it there."""

    _CLONE_NEWNET = 0x40000000
    _PATH = "/proc/thread-self/ns/net"

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def here(cls) -> _NetnsPin:
        if not sys.platform.startswith("linux"):
            return cls(None)
        try:
            return cls(os.open(cls._PATH, os.O_RDONLY | _O_CLOEXEC))
        except OSError:
            return cls(None)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        if self.fd is None or _same_file(self.fd, self._PATH):
            yield
            return
        current = os.open(self._PATH, os.O_RDONLY | _O_CLOEXEC)
        try:
            _setns(self.fd, self._CLONE_NEWNET)
            try:
                yield
            finally:
                _setns(current, self._CLONE_NEWNET)
        finally:
            os.close(current)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Handle:
    """One open pydivert handle on the NETWORK layer with filter ``expr``.

    Matching packets are taken from the network stack and queued here; a
    packet that is received and not re-injected is dropped. ``recv`` is
    blocking and meant for one thread; ``wake`` may be called from any thread.
    """

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self._netns = _NetnsPin.here()
        try:
            pydivert = _pydivert()
            self._divert: Any = pydivert.Divert(expr, layer=pydivert.Layer.NETWORK)
            self._divert.open()
        except (OSError, RuntimeError, NotImplementedError, ImportError) as exc:
            self._netns.release()
            raise DivertError(_describe_open_error(exc)) from exc
        self._open = True

    def recv(self, timeout: float) -> Captured | None:
        """The next diverted packet, None after ``timeout`` s; HandleShutDown once shut down."""
        if not self._open:
            raise HandleShutDown("handle closed")
        try:
            packet = self._divert.recv(timeout=timeout)
        except TimeoutError:
            return None
        except RuntimeError as exc:  # "Divert handle is not open"
            raise HandleShutDown(str(exc)) from exc
        except OSError as exc:
            if not self._open or exc.errno in (9, 108):  # EBADF / ESHUTDOWN: shut down
                raise HandleShutDown(str(exc)) from exc
            raise DivertError(f"receiving from the pydivert handle failed ({exc})") from exc
        return Captured(_segment(packet), packet)

    def reinject(self, captured: Captured) -> None:
        """Send a diverted packet on, unchanged."""
        self._divert.send(captured.packet)

    def wake(self) -> None:
        """Make a blocked ``recv`` return: at once where the backend can shut down
        receiving (eBPFDivert), else at its next timeout."""
        shutdown = getattr(self._divert, "shutdown", None)
        if self._open and callable(shutdown):
            with contextlib.suppress(OSError, RuntimeError):
                shutdown(_SHUTDOWN_RECV)

    def stats(self) -> dict[str, int]:
        """The backend's counters for this handle (empty where it has none)."""
        try:
            return {str(k): int(v) for k, v in self._divert.stats().items()}
        except (OSError, RuntimeError, AttributeError):
            return {}

    def close(self) -> None:
        """Detach the filter: from here on the kernel passes these packets again."""
        if self._open:
            self._open = False
            # Detaching goes by interface index, which only means something in the
            # namespace the handle was opened in: close there.
            with self._netns.entered():
                self._divert.close()
        self._netns.release()
