"""Kernel-side relay for the plain pipe: a BPF sockmap redirects each direction.

Both sockets of a pipe go into BPF socket maps whose stream-verdict program
(``SK_SKB``) hands every received skb straight to the other socket's egress,
so data never wakes user space. Linux and root (``CAP_BPF``/``CAP_NET_ADMIN``)
only; no libbpf: the program is a few raw eBPF instructions and the ``bpf(2)``
calls go through ctypes.

Four maps per pipe, so that no byte can be dropped while the pipe is set up:

- ``targets`` (SOCKHASH, no programs): key = the *source* socket's cookie,
  value = the socket its data goes to; the program redirects with
  ``bpf_sk_redirect_hash``.
- ``counts`` (HASH, cookie -> u64): bytes redirected from each source.
- ``modes`` (HASH, cookie -> any): a source listed here is handed to user
  space (the program returns SK_PASS).
- ``active`` (SOCKMAP, verdict program attached): a socket in it goes through
  the program. Both sockets are in ``targets`` before either is in
  ``active``, so the first redirected byte already finds its target.

What the kernel does not do, a user-space thread does, waking every few
milliseconds rather than per chunk of data:

- EOF: a FIN is not redirected, so on EOF (poll) the thread waits until every
  byte received on that socket was queued on the other one (TCP_INFO byte
  counters), then shuts the other's write side.
- Backpressure: the kernel queues redirected skbs for a busy target without
  limit (measured: 1.5 GB in 6 s when the far reader stopped) while it keeps
  acknowledging the sender. So once more than ``HIGH`` bytes are in flight
  (redirected, not yet queued on the target), the source is listed in
  ``modes``: its data now stays with it, charged to its receive buffer (TCP
  flow control again), and a thread copies it (recv/sendall) once the kernel
  has queued everything it redirected, up to EOF. There is no way back to
  the kernel path for that direction without reordering bytes. Pausing by
  taking the socket out of ``active`` instead was tried and loses data: the
  kernel drops an skb whose socket loses its verdict program while it is
  being read (one 64 KiB segment in ~10 % of stress runs).
- A socket that already has its FIN cannot join a sockmap (only established
  sockets can); if that happens to ``b`` at setup, ``b``'s direction is
  copied by the thread from the start.

Measured (docs/BENCHMARKS.md, issue 3): half the splice relay's throughput
when the CPU is the bottleneck, and a round trip only 0.04-0.11 ms shorter:
the kernel sends redirected skbs from a workqueue, so a kernel worker's
wake-up replaces the relay thread's, and it retries a full target a jiffy
later. Hence opt-in only (NOPF_PIPE_COPY=sockmap).

The pure part (instruction and attribute encoding) is separate from the
syscalls below it, so it is unit-tested on bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# --- constants (include/uapi/linux/bpf.h) -----------------------------------

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_PSEUDO_MAP_FD = 1

FN_MAP_LOOKUP_ELEM = 1
FN_GET_SOCKET_COOKIE = 46
FN_SK_REDIRECT_HASH = 72

# Opcodes: class | size/op | mode/source.
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW
LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
STX_DW = 0x7B  # BPF_STX | BPF_MEM | BPF_DW
ATOMIC_DW = 0xDB  # BPF_STX | BPF_ATOMIC | BPF_DW; imm 0 = BPF_ADD
MOV64_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X
MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
ADD64_K = 0x07  # BPF_ALU64 | BPF_ADD | BPF_K
JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
CALL = 0x85  # BPF_JMP | BPF_CALL
EXIT = 0x95  # BPF_JMP | BPF_EXIT

R0, R1, R2, R3, R4, R6, R10 = 0, 1, 2, 3, 4, 6, 10
SK_DROP, SK_PASS = 0, 1
SKB_LEN = 0  # offsetof(struct __sk_buff, len)

_SO_COOKIE = 57
_TCP_INFO_LEN = 232
_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked); bytes_received follows

HIGH = 8 << 20  # in flight above this: hand the direction to user space
_SIOCINQ, _SIOCOUTQ = 0x541B, 0x5411  # FIONREAD, TIOCOUTQ on Linux
FAST_MS, SLOW_MS = 4, 64  # the watcher's tick while data moves / backing off when idle


# --- pure encoding ----------------------------------------------------------

def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: u8 code, dst/src register nibbles, s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map_fd(dst: int, map_fd: int) -> bytes:
    """``dst = map``: a 16-byte ld_imm64 whose source register marks ``imm`` as a map fd."""
    return insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, map_fd) + insn(0)


def verdict_program(targets_fd: int, counts_fd: int, modes_fd: int) -> bytes:
    """The stream verdict: count the skb's bytes, redirect it by its socket's cookie.

    ::

        r6 = ctx
        if (ctx->len == 0) return SK_DROP
        *(u64 *)(r10 - 8) = get_socket_cookie(ctx)
        if (map_lookup_elem(modes, r10 - 8)) return SK_PASS
        r0 = map_lookup_elem(counts, r10 - 8)
        if (r0) lock *(u64 *)r0 += ctx->len
        return sk_redirect_hash(ctx, targets, r10 - 8, 0)     (0: egress)

    A bare FIN reaches the program as an empty skb; redirected, the kernel's
    sender takes "0 bytes sent" for a broken pipe (EPIPE on the target), so
    it is dropped: the FIN is already recorded on the socket. A missing
    ``targets`` key would drop data, which cannot happen: both sockets are in
    ``targets`` before either gets the program. A key in ``modes`` hands the
    socket's data to user space (SK_PASS: its receive queue, flow-controlled).
    """
    return b"".join([
        insn(MOV64_X, R6, R1),
        insn(LDX_W, R2, R6, SKB_LEN),
        insn(JNE_K, R2, off=2, imm=0),
        insn(MOV64_K, R0, imm=SK_DROP),
        insn(EXIT),
        insn(CALL, imm=FN_GET_SOCKET_COOKIE),
        insn(STX_DW, R10, R0, -8),
        ld_map_fd(R1, modes_fd),
        insn(MOV64_X, R2, R10),
        insn(ADD64_K, R2, imm=-8),
        insn(CALL, imm=FN_MAP_LOOKUP_ELEM),
        insn(JEQ_K, R0, off=2, imm=0),
        insn(MOV64_K, R0, imm=SK_PASS),
        insn(EXIT),
        ld_map_fd(R1, counts_fd),
        insn(MOV64_X, R2, R10),
        insn(ADD64_K, R2, imm=-8),
        insn(CALL, imm=FN_MAP_LOOKUP_ELEM),
        insn(JEQ_K, R0, off=2, imm=0),
        insn(LDX_W, R1, R6, SKB_LEN),
        insn(ATOMIC_DW, R0, R1, 0, 0),
        insn(MOV64_X, R1, R6),
        ld_map_fd(R2, targets_fd),
        insn(MOV64_X, R3, R10),
        insn(ADD64_K, R3, imm=-8),
        insn(MOV64_K, R4, imm=0),
        insn(CALL, imm=FN_SK_REDIRECT_HASH),
        insn(EXIT),
    ])


def map_create_attr(map_type: int, key_size: int, value_size: int, max_entries: int) -> bytes:
    # map_type, key_size, value_size, max_entries, map_flags
    return struct.pack("<5I", map_type, key_size, value_size, max_entries, 0)


def prog_load_attr(insns_ptr: int, insn_count: int, license_ptr: int,
                   log_ptr: int = 0, log_size: int = 0) -> bytes:
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf
    return struct.pack("<IIQQIIQ", BPF_PROG_TYPE_SK_SKB, insn_count, insns_ptr, license_ptr,
                       1 if log_size else 0, log_size, log_ptr)


def prog_attach_attr(target_fd: int, prog_fd: int, attach_type: int) -> bytes:
    # target_fd, attach_bpf_fd, attach_type, attach_flags
    return struct.pack("<4I", target_fd, prog_fd, attach_type, 0)


def map_elem_attr(map_fd: int, key_ptr: int, value_ptr: int = 0, flags: int = 0) -> bytes:
    # map_fd, (pad), key, value, flags
    return struct.pack("<IIQQQ", map_fd, 0, key_ptr, value_ptr, flags)


def tcp_bytes(info: bytes) -> tuple[int, int]:
    """(bytes_acked, bytes_received) of a ``struct tcp_info``; each counts SYN/FIN as 1."""
    acked, received = struct.unpack_from("<QQ", info, _TCPI_BYTES_ACKED)
    return acked, received


# --- syscalls ---------------------------------------------------------------

class Unsupported(OSError):
    """This host cannot redirect (not Linux, not root, kernel without sockmap)."""


_NR_BPF = {"x86_64": 321, "aarch64": 280}
_ATTR_SIZE = 144  # sizeof(union bpf_attr) on 6.x; the kernel checks the tail is zero
_libc: ctypes.CDLL | None = None


def _bpf(cmd: int, attr: bytes) -> int:
    global _libc
    nr = _NR_BPF.get(platform.machine())
    if nr is None or platform.system() != "Linux":
        raise Unsupported(errno.ENOSYS, f"no bpf(2) on {platform.system()}/{platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf,
                            ctypes.c_uint(_ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _cbuf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, len(data))


def _tcp(sock: socket.socket) -> tuple[int, int]:
    return tcp_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN))


def _ioctl_int(sock: socket.socket, request: int) -> int:
    import fcntl  # Linux only, like everything below

    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


def _written(sock: socket.socket) -> int:
    """Bytes ever queued for sending on ``sock`` (acked + send queue), never over-counted.

    Acked is read first: an ack landing between the two reads only lowers the sum.
    """
    acked, _ = _tcp(sock)
    return acked + _ioctl_int(sock, _SIOCOUTQ)


def _written_exact(sock: socket.socket) -> int:
    """``_written`` of a socket nobody writes to: re-read until no ack lands in between."""
    for _ in range(100):
        before = _written(sock)
        if _written(sock) == before:
            return before
    raise OSError(errno.EAGAIN, "the send counters of an idle socket kept changing")


@dataclass
class _Side:
    name: str
    sock: socket.socket
    key: int  # its socket cookie: its key in ``targets`` and ``counts``
    consumed_base: int  # bytes taken off its receive queue before the redirect
    written_base: int  # bytes queued on it before the redirect
    active: bool = False  # in the ``active`` map: its data is redirected
    user_copy: bool = False  # handed to user space: a thread copies the rest
    copier: threading.Thread | None = None
    quiet: int = 0  # consecutive ticks with nothing in flight
    eof: bool = False  # FIN seen
    done: bool = False  # everything before the FIN is queued on the other socket
    wr_shut: bool = False  # our FIN sent (the other side is done)


class Redirect:
    """Redirect between connected TCP sockets ``a`` and ``b`` in the kernel.

    ``Redirect(a, b)`` either sets everything up or raises (``Unsupported`` when
    the host cannot do it) having moved no data, so the caller can fall back to
    another copy method. ``run()`` blocks until both directions have ended;
    ``close()`` frees the kernel objects (the sockets stay the caller's).
    """

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self._fds: list[int] = []
        self._targets = self._counts = self._modes = self._active = -1
        self._target_keys: list[int] = []
        self.sides: dict[str, _Side] = {}
        self._copy_error: OSError | None = None
        self._last_totals: tuple[int, ...] = ()
        try:
            self._setup(a, b)
        except BaseException:
            self.close()
            raise

    def _create_map(self, map_type: int, key_size: int, value_size: int) -> int:
        fd = _bpf(BPF_MAP_CREATE, map_create_attr(map_type, key_size, value_size, 2))
        self._fds.append(fd)
        return fd

    def _setup(self, a: socket.socket, b: socket.socket) -> None:
        try:
            self._targets = self._create_map(BPF_MAP_TYPE_SOCKHASH, 8, 4)
        except OSError as exc:
            if isinstance(exc, Unsupported):
                raise
            raise Unsupported(exc.errno, f"cannot create a BPF sockhash: {exc.strerror}") \
                from exc
        self._counts = self._create_map(BPF_MAP_TYPE_HASH, 8, 8)
        self._modes = self._create_map(BPF_MAP_TYPE_HASH, 8, 8)
        self._active = self._create_map(BPF_MAP_TYPE_SOCKMAP, 4, 4)
        prog = verdict_program(self._targets, self._counts, self._modes)
        insns, license_, log = _cbuf(prog), ctypes.create_string_buffer(b"GPL"), \
            ctypes.create_string_buffer(1 << 16)
        args = (ctypes.addressof(insns), len(prog) // 8, ctypes.addressof(license_))
        try:
            self._prog = _bpf(BPF_PROG_LOAD, prog_load_attr(*args))
        except OSError as exc:
            # Load again with the verifier's log, for its last line as the reason.
            with contextlib.suppress(OSError):
                os.close(_bpf(BPF_PROG_LOAD,
                              prog_load_attr(*args, ctypes.addressof(log), len(log))))
            lines = log.value.decode(errors="replace").strip().splitlines()
            raise Unsupported(exc.errno, "the kernel rejected the redirect program: "
                              f"{lines[-1] if lines else exc.strerror}") from exc
        self._fds.append(self._prog)
        _bpf(BPF_PROG_ATTACH,
             prog_attach_attr(self._active, self._prog, BPF_SK_SKB_STREAM_VERDICT))
        # Nobody reads or writes the sockets until they are active, so these are exact.
        for name, s in (("a", a), ("b", b)):
            cookie = struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8))[0]
            consumed = _tcp(s)[1] - _ioctl_int(s, _SIOCINQ)
            self.sides[name] = _Side(name, s, cookie, consumed, _written_exact(s))
        sa, sb = self.sides["a"], self.sides["b"]
        for src, dst in ((sa, sb), (sb, sa)):
            self._map_update(self._counts, src.key.to_bytes(8, "little"), bytes(8))
            self._map_update(self._targets, src.key.to_bytes(8, "little"),
                             struct.pack("<I", dst.sock.fileno()))
            self._target_keys.append(src.key)
        self._activate(sa)  # if this fails, no byte has moved: the caller may fall back
        try:
            self._activate(sb)
        except OSError:
            sb.user_copy = True  # e.g. its FIN came already; a's data flows regardless

    def _map_update(self, map_fd: int, key: bytes, value: bytes) -> None:
        k, v = _cbuf(key), _cbuf(value)
        _bpf(BPF_MAP_UPDATE_ELEM,
             map_elem_attr(map_fd, ctypes.addressof(k), ctypes.addressof(v)))

    def _map_delete(self, map_fd: int, key: bytes) -> None:
        k = _cbuf(key)
        _bpf(BPF_MAP_DELETE_ELEM, map_elem_attr(map_fd, ctypes.addressof(k)))

    def _activate(self, side: _Side) -> None:
        index = (0 if side.name == "a" else 1).to_bytes(4, "little")
        self._map_update(self._active, index, struct.pack("<I", side.sock.fileno()))
        side.active = True
        # Data already queued waits for the next data_ready (it may never come):
        # setting SO_RCVLOWAT runs it now (tcp_set_rcvlowat -> tcp_data_ready).
        side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _deactivate(self, side: _Side) -> None:
        self._map_delete(self._active, (0 if side.name == "a" else 1).to_bytes(4, "little"))
        side.active = False

    def _other(self, side: _Side) -> _Side:
        return self.sides["b" if side.name == "a" else "a"]

    def redirected(self, src: _Side) -> int:
        """Bytes the program has redirected from ``src``."""
        k, v = _cbuf(src.key.to_bytes(8, "little")), ctypes.create_string_buffer(8)
        _bpf(BPF_MAP_LOOKUP_ELEM,
             map_elem_attr(self._counts, ctypes.addressof(k), ctypes.addressof(v)))
        value: int = struct.unpack("<Q", v.raw)[0]
        return value

    def forwarded(self, src: _Side) -> int:
        """Bytes from ``src`` queued on the other socket so far (a lower bound)."""
        dst = self._other(src)
        # Once our FIN is queued on dst, the sequence space counts it too.
        return _written(dst.sock) - dst.written_base - (1 if dst.wr_shut else 0)

    def run(self, stopping: Callable[[], bool],
            on_progress: Callable[[int, int], None] | None = None) -> None:
        """Watch until both directions have ended; raise the first socket error.

        The OSError raised carries ``_nopf_side``: "a" or "b", the failed socket.
        ``on_progress(a_to_b, b_to_a)`` reports bytes forwarded, now and then.
        """
        poller = select.poll()
        by_fd = {s.sock.fileno(): s for s in self.sides.values()}
        for fd in by_fd:
            poller.register(fd, select.POLLRDHUP | select.POLLERR)
        tick = FAST_MS
        last_report = 0.0
        while not stopping():
            for fd, ev in poller.poll(tick):
                side = by_fd[fd]
                if stopping():
                    return
                if ev & select.POLLERR or (ev & select.POLLHUP and not side.wr_shut):
                    code = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    code = code or errno.ECONNRESET
                    exc = OSError(code, os.strerror(code))
                    exc._nopf_side = side.name  # type: ignore[attr-defined]
                    raise exc
                if not side.eof:
                    side.eof = True
                    poller.modify(fd, select.POLLERR)  # RDHUP is level-triggered
                if side.wr_shut:
                    poller.unregister(fd)  # both ways shut: HUP from now on
            if self._copy_error is not None:
                raise self._copy_error
            busy = self._step()
            now = time.monotonic()
            finished = all(s.done for s in self.sides.values())
            if on_progress is not None and (finished or now - last_report > 0.2):
                last_report = now
                on_progress(self.forwarded(self.sides["a"]), self.forwarded(self.sides["b"]))
            if finished:
                return
            tick = FAST_MS if busy else min(tick * 2, SLOW_MS)

    def _step(self) -> bool:
        """Backpressure and EOF for both directions; True while anything moves."""
        busy = False
        for side in self.sides.values():
            if side.done:
                continue
            in_flight = self.redirected(side) - self.forwarded(side)
            if in_flight > 0 or not side.active:
                busy = True
            if side.active and not side.user_copy and in_flight > HIGH:
                # From now on the program passes this socket's data up (SK_PASS) and a
                # thread copies it: see the module docstring for why not pause instead.
                self._map_update(self._modes, side.key.to_bytes(8, "little"), bytes(8))
                side.user_copy = True
            if side.user_copy:
                # Copy by hand once the kernel has queued everything it redirected
                # (keeps the byte order).
                side.quiet = side.quiet + 1 if in_flight <= 0 else 0
                # Two quiet ticks: a program run that missed the switch has finished.
                if side.copier is None and side.quiet >= 2:
                    side.copier = threading.Thread(target=self._copy_rest, args=(side,),
                                                   name=f"sockmap-{side.name}-tail",
                                                   daemon=True)
                    side.copier.start()
                continue
            if side.eof:
                busy = True
                # After the FIN, bytes_received counts it too: one more than the data.
                data = _tcp(side.sock)[1] - 1 - side.consumed_base
                if self.forwarded(side) >= data:
                    other = self._other(side)
                    other.wr_shut = side.done = True
                    with contextlib.suppress(OSError):
                        other.sock.shutdown(socket.SHUT_WR)
        if not busy:
            # Idle ticks back off; a change in the counters since the last look is busy too.
            totals = tuple(self.redirected(s) for s in self.sides.values())
            busy = bool(self._last_totals) and totals != self._last_totals
            self._last_totals = totals
        return busy

    def _copy_rest(self, side: _Side) -> None:
        """Copy ``side``'s receive queue to the other socket by hand, up to EOF."""
        other = self._other(side)
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        failed = side
        waiter = select.poll()
        waiter.register(side.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        try:
            while True:
                try:
                    n = side.sock.recv_into(buf)
                except BlockingIOError:
                    # A blocking recv on a sockmap socket can still say EAGAIN (data
                    # not yet through the verdict): wait for it and ask again.
                    waiter.poll(100)
                    continue
                if not n:
                    break
                failed = other
                other.sock.sendall(view[:n])
                failed = side
            other.wr_shut = True  # first: the watcher takes HUP before it for an error
            with contextlib.suppress(OSError):
                other.sock.shutdown(socket.SHUT_WR)
            side.done = True
        except OSError as exc:
            exc._nopf_side = failed.name  # type: ignore[attr-defined]
            self._copy_error = exc

    def close(self) -> None:
        """Take the sockets out of the maps, free the maps and program (idempotent)."""
        for side in self.sides.values():
            if side.active:
                with contextlib.suppress(OSError):
                    self._deactivate(side)
        for key in self._target_keys:
            with contextlib.suppress(OSError):
                self._map_delete(self._targets, key.to_bytes(8, "little"))
        self._target_keys.clear()
        if self._active >= 0 and hasattr(self, "_prog"):
            with contextlib.suppress(OSError):
                _bpf(BPF_PROG_DETACH,
                     prog_attach_attr(self._active, self._prog, BPF_SK_SKB_STREAM_VERDICT))
        while self._fds:
            os.close(self._fds.pop())
