"""The encrypted tunnel's per-record Python work, in one process, without sockets.

A benchmark (not a test): one bulk stream through the real sans-IO machines of
both tunnel ends (mux -> resume -> record on the sending end, record -> resume
-> mux on the receiving end), glued the way the asyncio drivers glue them
(``Stream.feed`` / ``Mux._flush`` / ``ResumableChannel.writelines`` /
``SecureChannel.writelines`` on one side, ``_Protocol.buffer_updated`` /
``on_record`` / ``Mux._on_record`` / ``Stream._deliver`` on the other), so
what it times is what the drivers run per record minus the event loop and
the system calls, in CPU time of the thread (so other processes on the cores
count little). The sender is fed 256 KiB reads as the forwarder takes them:
into a slab of the tunnel's pool (``--reads slabs``, the default: that copy
stands for ``recv_into``'s and is untimed; the records are sealed in place),
or as fresh ``bytes`` (``--reads bytes``: what asyncio's ``data_received``
gave before the slabs). What it would ``send`` is copied (untimed, standing for the kernel's
copy) and written into the receiver's ``get_buffer`` views in
``recv_into``-sized pieces (the record and the next header, as on the wire;
that copy is untimed too). The receiver's WINDOW_UPDATEs and ACKs go back
to the sender the same way.

Reports microseconds per 256 KiB record at each end, and how much of it is
not AES-GCM (AES-GCM timed alone on the same record size with the same
calls). ``--profile send|recv`` prints cProfile's hottest calls of that end.

    .venv/bin/python -m bench.record_path [--mb 1024] [--rounds 5] [--reads slabs|bytes]
                                          [--profile send]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nopf_web.buffers import Buffer
from nopf_web.tunnel import mux_machine as mm, record_machine as rm, resume_machine as rs
from nopf_web.tunnel.resumable import _keep_freed_memory
from nopf_web.tunnel.slab import SlabPool
from nopf_web.wire.frames import INITIAL_WINDOW

READ = 256 * 1024  # one local read (asyncio's read size for a Protocol)
CODE = "7-orbit-lantern"


class End:
    """One tunnel end: its three machines and the driver glue of the hot path."""

    def __init__(self, role: Any) -> None:
        self.record = rm.RecordMachine.handshake(role, CODE)
        self.resume = rs.ResumeMachine(role)
        self.mux = mm.MuxMachine(role=role, window=INITIAL_WINDOW)
        self.path = self.resume.add_path("lan", 0.0, first=True)
        self.slabs = SlabPool(READ)  # the local reads' buffers, as the Mux has
        self.wire_out: list[bytes] = []  # what the drivers would send, in order
        self.delivered = 0  # stream bytes the local application got
        self.untimed = 0.0  # seconds in the copies that stand for the kernel's

    # -- sending (Stream.feed, then Mux._flush in the next loop iteration) -----

    def feed(self, stream_id: int, data: Buffer, now: float) -> None:
        self.mux.send(stream_id, data, eager=True)  # as Stream.feed
        self.flush(now)

    def feed_slab(self, stream_id: int, read: bytes, now: float) -> None:
        """One local read as _Local.get_buffer/buffer_updated take it: into a slab
        of the pool (the copy stands for recv_into's: untimed), whose view the
        stream queues."""
        slab = self.slabs.take()
        t = time.thread_time()
        slab.room()[: len(read)] = read
        self.untimed += time.thread_time() - t
        assert len(read) >= self.slabs.lend_min
        if slab is self.slabs.scratch:  # none to lend: copied out, as the forwarder does
            self.feed(stream_id, bytes(slab.room()[: len(read)]), now)
        else:
            self.feed(stream_id, slab.view(len(read)), now)

    def flush(self, now: float) -> None:
        mux = self.mux
        while mux.wants_to_send:
            parts, events = mux.data_to_send(now)
            if not parts:
                break
            self._writelines(parts, now)
            del events  # StreamWritable: resume the local reads (not modelled)

    def _writelines(self, parts: list[bytes | memoryview], now: float) -> None:
        # ResumableChannel.writelines -> SecureChannel.writelines
        events = self.resume.send(parts, now)
        for event in events:
            assert type(event) is rs.Send
            for record in self.record.seal(event.parts):
                self._send(record)

    def _send(self, record: memoryview) -> None:
        t = time.thread_time()
        self.wire_out.append(bytes(record))  # the kernel's copy: not ours
        self.untimed += time.thread_time() - t

    # -- receiving (_Protocol.buffer_updated -> on_record -> Mux._on_record) ----

    def receive(self, wire: bytes, now: float) -> None:
        """``wire`` through get_buffer/buffer_updated, as recv_into would fill it."""
        view, pos, record = memoryview(wire), 0, self.record
        clock = time.thread_time  # CPU time: other processes on the cores do not count
        while pos < len(view):
            room = record.get_buffer(-1)
            n = min(len(room), len(view) - pos)
            t = clock()
            room[:n] = view[pos : pos + n]
            self.untimed += clock() - t
            pos += n
            del room
            self._on_events(record.buffer_updated(n), now)

    def _on_events(self, events: list[rm.RecordEvent], now: float) -> None:
        for event in events:
            if type(event) is rm.RecordReceived:
                self._on_record(event.plaintext, now)
            elif type(event) is rm.Transmit:
                self.wire_out.append(event.data)

    def _on_record(self, plain: bytes | memoryview, now: float) -> None:
        for event in self.resume.receive(self.path, plain, now):
            if type(event) is rs.Deliver:
                self._on_mux(event.data, now)
            elif type(event) is rs.Send:
                self._writelines_raw(event.parts)

    def _writelines_raw(self, parts: list[Buffer]) -> None:
        for record in self.record.seal(parts):
            self._send(record)

    def _on_mux(self, data: memoryview, now: float) -> None:
        mux = self.mux
        delivered: dict[int, int] = {}
        for event in mux.receive(data, now):
            if type(event) is mm.StreamData:
                delivered[event.stream_id] = delivered.get(event.stream_id, 0) \
                    + len(event.data)
        for sid, n in delivered.items():  # Stream._deliver: sent locally, then credited
            self.delivered += n
            mux.consumed(sid, n)
        if mux.wants_to_send:
            self.flush(now)

    def timer(self, now: float) -> None:
        """The resume layer's timer (its ACKs); the mux's keepalive is idle here."""
        for event in self.resume.timer(now):
            if type(event) is rs.Send:
                self._writelines_raw(event.parts)


def _handshake(a: End, b: End) -> None:
    for end in (a, b):
        for event in end.record.start(0.0):
            if type(event) is rm.Transmit:
                end.wire_out.append(event.data)
    for _ in range(3):
        for src, dst in ((a, b), (b, a)):
            wire, src.wire_out = b"".join(src.wire_out), []
            if wire:
                dst._on_events(dst.record.receive_data(wire), 0.0)
    a.untimed = b.untimed = 0.0
    assert a.record.can_send and b.record.can_send and a.record.confirmed


def run(mb: int, profile: str | None, reads_in: str = "slabs") -> tuple[float, float, int]:
    """µs per record at the sending and the receiving end, and records sent."""
    sender, receiver = End("client"), End("server")  # the connector sends, as in the lab
    _handshake(sender, receiver)
    sender.mux.start(0.0)
    receiver.mux.start(0.0)
    sid = sender.mux.open_stream()
    reads = [os.urandom(READ) for _ in range(8)]  # fresh objects, as reads are
    total = mb * 1024 * 1024 // READ
    clock = time.thread_time  # CPU time: other processes on the cores do not count
    send_time = recv_time = 0.0
    prof = cProfile.Profile() if profile else None
    now = 0.0
    for i in range(total):
        now += 0.0003  # about 3 GB/s of wall clock: the resume layer's ACK timers fire
        read = reads[i % 8]
        data = bytes(read) if reads_in == "bytes" else b""  # a new 256 KiB object per read
        if profile == "send":
            assert prof is not None
            prof.enable()
        t = clock()
        if data:
            sender.feed(sid, data, now)
        else:
            sender.feed_slab(sid, read, now)
        send_time += clock() - t
        if profile == "send":
            assert prof is not None
            prof.disable()
        wire, sender.wire_out = b"".join(sender.wire_out), []
        if profile == "recv":
            assert prof is not None
            prof.enable()
        t = clock()
        receiver.receive(wire, now)
        receiver.timer(now)
        recv_time += clock() - t
        if profile == "recv":
            assert prof is not None
            prof.disable()
        back, receiver.wire_out = b"".join(receiver.wire_out), []
        if back:
            t = clock()
            sender.receive(back, now)
            send_time += clock() - t
    assert receiver.delivered == total * READ, (receiver.delivered, total * READ)
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    # The copies stand for send's and recv_into's (the kernel's): not ours.
    return ((send_time - sender.untimed) / total * 1e6,
            (recv_time - receiver.untimed) / total * 1e6, total)


def aes_only(n: int = 400) -> tuple[float, float]:
    """µs to seal and to open one full record with the calls the machine uses."""
    aead = AESGCM(os.urandom(32))
    plain = memoryview(bytearray(os.urandom(READ + 9 + 17)))
    out = memoryview(bytearray(len(plain) + 16))
    header, nonce = b"\0\0\0\0", bytes(12)
    t = time.thread_time()
    for _ in range(n):
        aead.encrypt_into(nonce, plain, header, out)
    seal = (time.thread_time() - t) / n * 1e6
    sealed = bytes(out)
    body = memoryview(bytearray(sealed))
    t = time.thread_time()
    for _ in range(n):
        aead.decrypt(nonce, body, header)
    opened = (time.thread_time() - t) / n * 1e6
    return seal, opened


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--mb", type=int, default=1024, help="MiB per round (default 1024)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", choices=["slabs", "bytes"], default="slabs",
                    help="local reads into the pool's slabs (the forwarder's way) or as "
                         "fresh bytes (asyncio's data_received)")
    ap.add_argument("--profile", choices=["send", "recv"])
    args = ap.parse_args(argv)
    _keep_freed_memory()  # as ResumableChannel does in the tunnel's process
    if args.profile:
        run(args.mb, args.profile, args.reads)
        return
    sends, recvs, seals, opens = [], [], [], []
    for r in range(args.rounds):
        seal, opened = aes_only()
        send, recv, total = run(args.mb, None, args.reads)
        sends.append(send)
        recvs.append(recv)
        seals.append(seal)
        opens.append(opened)
        print(f"round {r + 1}: {total} records: send {send:.1f} µs/record "
              f"(AES-GCM {seal:.1f}), receive {recv:.1f} µs/record (AES-GCM {opened:.1f})",
              flush=True)
    report: list[tuple[str, list[float], list[float]]] = [
        ("sending end", sends, seals), ("receiving end", recvs, opens)]
    for name, per, aes in report:
        med, aes_med = statistics.median(per), statistics.median(aes)
        print(f"{name}: median {med:.1f} µs per 256 KiB record "
              f"({med * 4096 / 1e6:.3f} CPU-s/GB), AES-GCM {aes_med:.1f} µs, "
              f"not AES-GCM {med - aes_med:.1f} µs ({(med - aes_med) / med:.0%})")


_: Callable[..., object] = main
if __name__ == "__main__":
    main()
