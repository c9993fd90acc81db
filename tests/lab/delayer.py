"""User-space packet delayer for the lab's internet router (no ``sch_netem`` here).

The lab installs, in the router namespace,
``iptables -t mangle -A FORWARD -j NFQUEUE --queue-num N`` and runs this module
inside that namespace (``ip netns exec NS python delayer.py --queue N ...``).
Every forwarded packet is then handed to this process, which holds it for
``delay ± jitter`` milliseconds (uniform jitter, so packets may be reordered,
as with netem) and then gives the kernel an ``NF_ACCEPT`` verdict, or an
``NF_DROP`` verdict straight away with probability ``loss``.

It talks nfnetlink_queue directly over an ``AF_NETLINK`` socket of protocol
``NETLINK_NETFILTER`` (12) with only :mod:`socket` and :mod:`struct`.

Wire layout (all of it is netlink; "native" = host byte order)
-----------------------------------------------------------------
Every message starts with a 16-byte ``struct nlmsghdr`` in native order::

    u32 nlmsg_len     total length including this header
    u16 nlmsg_type    (NFNL_SUBSYS_QUEUE = 3) << 8 | NFQNL_MSG_*
                      NFQNL_MSG_PACKET = 0 (kernel -> us),
                      NFQNL_MSG_VERDICT = 1, NFQNL_MSG_CONFIG = 2 (us -> kernel)
                      or NLMSG_ERROR = 2 (an ack / error, kernel -> us)
    u16 nlmsg_flags   NLM_F_REQUEST = 1, NLM_F_ACK = 4
    u32 nlmsg_seq
    u32 nlmsg_pid     0 = the kernel

followed (for nfnetlink types) by the 4-byte ``struct nfgenmsg``::

    u8    nfgen_family   AF_UNSPEC / AF_INET
    u8    version        NFNETLINK_V0 = 0
    be16  res_id         the queue number, BIG-endian

followed by netlink attributes, each ``u16 nla_len, u16 nla_type`` in native
order, then the payload, padded to a multiple of 4 bytes (``nla_len`` excludes
the padding; the top two bits of ``nla_type`` are flags, masked off). Payloads
of the nfqueue attributes are in network (big-endian) order:

* config (``NFQNL_MSG_CONFIG``):
    - ``NFQA_CFG_CMD`` (1): ``u8 command, u8 pad, be16 pf``;
      command ``NFQNL_CFG_CMD_BIND`` = 1 binds this socket to ``res_id``.
    - ``NFQA_CFG_PARAMS`` (2): ``be32 copy_range, u8 copy_mode`` (5 bytes);
      we use ``NFQNL_COPY_META`` = 1 (metadata only, no payload copy).
    - ``NFQA_CFG_QUEUE_MAXLEN`` (3): ``be32`` packets the kernel may hold.
    - ``NFQA_CFG_MASK`` (4) / ``NFQA_CFG_FLAGS`` (5): ``be32`` each;
      ``NFQA_CFG_F_FAIL_OPEN`` = 1 accepts packets if the queue overflows.
  Each config request carries ``NLM_F_ACK``; the kernel replies with
  ``NLMSG_ERROR``: ``s32 error`` (0 = success, else ``-errno``) + the request.
* packet (``NFQNL_MSG_PACKET``, kernel -> us):
    - ``NFQA_PACKET_HDR`` (1): ``be32 packet_id, be16 hw_protocol, u8 hook``.
    (other attributes - mark, timestamps, interfaces... - are ignored.)
* verdict (``NFQNL_MSG_VERDICT``, us -> kernel, same ``res_id``):
    - ``NFQA_VERDICT_HDR`` (2): ``be32 verdict, be32 packet_id``;
      ``NF_DROP`` = 0, ``NF_ACCEPT`` = 1. Verdicts may be given in any order.

Lifetime: the process prints ``ready`` on stdout once bound, and exits by
itself when stdin reaches EOF (``--watch-stdin``: the lab holds the other end
of that pipe, so it closes whenever the lab process dies) or when the process
``--parent-pid`` no longer exists (polled twice a second). SIGTERM ends it too;
the kernel then drops whatever was still queued.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP = 0
NF_ACCEPT = 1
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
NLA_TYPE_MASK = 0x3FFF

NLMSGHDR = struct.Struct("=IHHII")  # native endian
NFGENMSG = struct.Struct("!BBH")  # family, version, be16 res_id
NLATTR = struct.Struct("=HH")  # native endian
VERDICT_HDR = struct.Struct("!II")  # be32 verdict, be32 id
PACKET_HDR = struct.Struct("!IHB")  # be32 id, be16 hw proto, u8 hook


def _attr(kind: int, payload: bytes) -> bytes:
    """Encode one netlink attribute, padded to 4 bytes."""
    length = NLATTR.size + len(payload)
    pad = (-length) % 4
    return NLATTR.pack(length, kind) + payload + b"\0" * pad


def _message(msg_type: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    """Encode one nfnetlink message for the queue subsystem."""
    body = NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _parse_attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """Parse the attributes in ``data[offset:end]`` (later duplicates win)."""
    attrs: dict[int, bytes] = {}
    while offset + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size:
            break
        attrs[kind & NLA_TYPE_MASK] = data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return attrs


class QueueError(OSError):
    """The kernel refused a queue configuration request."""


class NfQueue:
    """A minimal nfnetlink_queue client bound to one queue number."""

    def __init__(self, queue: int, maxlen: int = 65536, rcvbuf: int = 8 << 20) -> None:
        self.queue = queue
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE (root), then the capped one
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                    break
                except OSError:
                    continue
            # Overruns are not fatal: the kernel already dropped/accepted those packets.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
            bind = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)
            self._request(msg_type, _attr(NFQA_CFG_CMD, bind))
            params = struct.pack("!IB", 0, NFQNL_COPY_META)
            self._request(msg_type, _attr(NFQA_CFG_PARAMS, params))
            self._request(msg_type, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))
            flags = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
            self._request(msg_type, _attr(NFQA_CFG_MASK, flags) + _attr(NFQA_CFG_FLAGS, flags))
        except BaseException:
            self.sock.close()
            raise

    def _request(self, msg_type: int, attrs: bytes) -> None:
        """Send a config request with NLM_F_ACK and wait for its ack."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, self.queue, attrs))
        deadline = time.monotonic() + 5.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise QueueError(errno.ETIMEDOUT, "no ack from nfnetlink_queue")
            data = self.sock.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _flags, rseq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    break
                if kind == NLMSG_ERROR and rseq == seq:
                    (err,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
                    if err:
                        raise QueueError(-err, f"nfqueue config: {os.strerror(-err)}")
                    return
                offset += (length + 3) & ~3

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[int]:
        """Read what is pending (non-blocking) and return the queued packet ids."""
        ids: list[int] = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return ids
            except OSError as exc:  # ENOBUFS despite NETLINK_NO_ENOBUFS: keep going
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size or offset + length > len(data):
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    start = offset + NLMSGHDR.size + NFGENMSG.size
                    hdr = _parse_attrs(data, start, offset + length).get(NFQA_PACKET_HDR)
                    if hdr is not None and len(hdr) >= PACKET_HDR.size:
                        ids.append(PACKET_HDR.unpack_from(hdr)[0])
                offset += (length + 3) & ~3

    def verdicts(self, items: list[tuple[int, int]]) -> None:
        """Send ``(packet_id, verdict)`` pairs, several messages per datagram."""
        msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
        for start in range(0, len(items), 256):
            chunk = []
            for packet_id, verdict in items[start : start + 256]:
                self.seq += 1
                attrs = _attr(NFQA_VERDICT_HDR, VERDICT_HDR.pack(verdict, packet_id))
                chunk.append(_message(msg_type, NLM_F_REQUEST, self.seq, self.queue, attrs))
            self.sock.send(b"".join(chunk))

    def close(self) -> None:
        self.sock.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    queue: int,
    delay_ms: float,
    jitter_ms: float,
    loss: float,
    parent_pid: int,
    watch_stdin: bool,
    seed: int | None = None,
) -> int:
    """Serve the queue until told to stop; returns the process exit code."""
    rng = random.Random(seed)
    nfq = NfQueue(queue)
    print("ready", flush=True)
    held: list[tuple[float, int, int]] = []  # (release time, tie-breaker, packet id)
    counter = 0
    watched: list[int] = [nfq.fileno()]
    if watch_stdin:
        watched.append(sys.stdin.fileno())
    next_parent_check = time.monotonic() + 0.5
    try:
        while True:
            now = time.monotonic()
            due: list[tuple[int, int]] = []
            while held and held[0][0] <= now:
                due.append((heapq.heappop(held)[2], NF_ACCEPT))
            if due:
                nfq.verdicts(due)
            if parent_pid and now >= next_parent_check:
                if not _alive(parent_pid):
                    return 0
                next_parent_check = now + 0.5
            timeout = next_parent_check - now if parent_pid else 1.0
            if held:
                timeout = min(timeout, held[0][0] - now)
            ready, _, _ = select.select(watched, [], [], max(timeout, 0.0))
            if (
                watch_stdin
                and sys.stdin.fileno() in ready
                and not os.read(sys.stdin.fileno(), 4096)
            ):
                return 0
            if nfq.fileno() not in ready:
                continue
            now = time.monotonic()
            immediate: list[tuple[int, int]] = []
            for packet_id in nfq.receive():
                if loss > 0 and rng.random() < loss:
                    immediate.append((packet_id, NF_DROP))
                    continue
                hold = delay_ms + (rng.uniform(-jitter_ms, jitter_ms) if jitter_ms else 0.0)
                if hold <= 0:
                    immediate.append((packet_id, NF_ACCEPT))
                else:
                    counter += 1
                    heapq.heappush(held, (now + hold / 1000.0, counter, packet_id))
            if immediate:
                nfq.verdicts(immediate)
    finally:
        nfq.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--queue", type=int, default=0, help="NFQUEUE number (default 0)")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability, 0..1")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this pid is gone")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not 0.0 <= args.loss <= 1.0 or args.delay_ms < 0 or args.jitter_ms < 0:
        parser.error("need 0 <= loss <= 1, delay_ms >= 0, jitter_ms >= 0")
    try:
        return run(
            args.queue,
            args.delay_ms,
            args.jitter_ms,
            args.loss,
            args.parent_pid,
            args.watch_stdin,
            args.seed,
        )
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"delayer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
