"""The thread floor relay carrying the tunnel's real layers: an experiment (issue 16).

Like ``bench.pump_floor --mode thread`` (blocking sockets, threads), but the
bytes between the ends are the encrypted tunnel's own: in-band SPAKE2 and
AES-256-GCM records (:class:`~nopf_web.tunnel.record_machine.RecordMachine`),
the resume layer's numbered messages, ACKs and replay buffer
(:class:`~nopf_web.tunnel.resume_machine.ResumeMachine`) and the mux's frames
and credit (:class:`~nopf_web.tunnel.mux_machine.MuxMachine`), the sans-IO
machines the asyncio drivers use, called here from threads under one lock per
tunnel. It measures what those layers cost in a thread design, not a product:
one tunnel (one TCP connection, one stream) per application connection, no
resume after a cut (one path only), a fixed pairing code.

Per tunnel, three threads: the *reader* (local socket -> ``mux.send`` ->
``mux.data_to_send`` -> ``resume.send`` -> ``record.seal`` -> ``sendall``),
the *writer* (the same flush for what the reader does not send: credit,
ACKs, data that waited for credit, both machines' timers) and the *receiver*
(``recv_into`` the record machine's buffer -> resume -> mux -> ``sendall`` to
the local socket, then ``mux.consumed``). Machine calls are under one lock
per tunnel; sealing and sending under a second one, taken first, so records
go out in the order the resume layer numbered them; only the receiver opens
records, outside both.

    python -m bench.pump_layers near|far --listen HOST:PORT --to HOST:PORT
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable

from bench.pump_floor import _nodelay, _parse_addr
from nopf_web.buffers import Buffer
from nopf_web.roles import PeerRole
from nopf_web.tunnel import mux_machine as mm, record_machine as rm, resume_machine as rs
from nopf_web.tunnel.errors import TunnelError
from nopf_web.tunnel.resumable import _keep_freed_memory

CODE = "7-orbit-lantern"  # the in-band SPAKE2 code of every tunnel (a benchmark)
READ = 256 * 1024  # one local read, as asyncio's
HANDSHAKE_S = 10.0
Chunk = bytes | memoryview | None  # stream data for the local socket; None: its EOF


class HandshakeFailed(Exception):
    """The in-band handshake did not complete."""


class Tunnel:
    """One application connection over its own tunnel connection."""

    def __init__(self, sock: socket.socket, role: PeerRole, local: socket.socket | None,
                 service: tuple[str, int] | None) -> None:
        self.sock = sock
        self.role = role
        self.local = local
        self.service = service
        lock = threading.Lock()  # the machines' lock
        self.cond = threading.Condition(lock)  # wakes the writer
        self.writable = threading.Condition(lock)  # wakes the reader (StreamWritable)
        self.seal_lock = threading.Lock()  # sealing and sending, in order
        self.record = rm.RecordMachine.handshake(role, CODE)
        self.resume = rs.ResumeMachine(role)
        self.mux = mm.MuxMachine(role=role)
        self.path = 0
        self.sid = 0
        self.pending: list[list[Buffer]] = []  # resume messages to seal (writer)
        self.early: list[rm.RecordEvent] = []  # records that came with the handshake
        self.closing = False  # the stream is done both ways: CLOSE, then end
        self.failed = False
        self.threads: list[threading.Thread] = []

    # -- set-up ----------------------------------------------------------------

    def handshake(self) -> None:
        sock, record = self.sock, self.record
        sock.settimeout(HANDSHAKE_S)
        self._handshake_events(record.start(time.monotonic()))
        while not record.can_send:
            data = sock.recv(65536)
            if not data:
                raise HandshakeFailed("the peer closed during the handshake")
            self._handshake_events(record.receive_data(data))
        sock.settimeout(None)
        now = time.monotonic()
        self.path = self.resume.add_path("lan", now, first=True)
        self.mux.start(now)
        if self.local is not None:  # the near end opens the stream
            self.sid = self.mux.open_stream()

    def _handshake_events(self, events: list[rm.RecordEvent]) -> None:
        for event in events:
            if type(event) is rm.Transmit:
                self.sock.sendall(event.data)
            elif type(event) is rm.ChannelFailed:
                raise HandshakeFailed(str(event.error))
            elif type(event) is rm.RecordReceived:
                self.early.append(event)

    def run(self) -> None:
        """Relay until the stream ended both ways (or anything failed)."""
        targets = [self._writer, self._receiver] + ([self._reader] if self.local else [])
        for target in targets:
            self._spawn(target)
        for t in self.threads[:2]:  # writer, receiver
            t.join()
        if self.local is not None:  # a reader still blocked after a failure
            with contextlib.suppress(OSError):
                self.local.shutdown(socket.SHUT_RDWR)
        for t in self.threads[2:]:
            t.join()
        for s in (self.sock, self.local):
            if s is not None:
                s.close()

    def _spawn(self, target: Callable[[], None]) -> None:
        t = threading.Thread(target=self._guard, args=(target,), daemon=True,
                             name=f"layers-{target.__name__}")
        self.threads.append(t)
        t.start()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except (OSError, TunnelError, HandshakeFailed) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        print(f"pump_layers: {why}", file=sys.stderr, flush=True)
        with self.cond:
            self.failed = True
            self.cond.notify_all()
            self.writable.notify_all()
        for s in (self.sock, self.local):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    # -- machine events (under the lock) ---------------------------------------

    def _mux_events(self, events: list[mm.MuxEvent], deliver: list[tuple[int, Chunk]],
                    ) -> None:
        for event in events:
            if type(event) is mm.StreamData:
                deliver.append((event.stream_id, event.data))
            elif type(event) is mm.StreamEof:
                deliver.append((event.stream_id, None))
            elif type(event) is mm.StreamOpened:
                self.sid = event.stream_id
            elif type(event) is mm.StreamDone:
                self._close()
            elif isinstance(event, mm.StreamFailed | mm.TunnelEnded):
                raise TunnelError(f"the mux ended: {event!r}")
            elif type(event) is mm.StreamWritable:
                self.writable.notify()

    def _resume_events(self, events: list[rs.ResumeEvent],
                       deliver: list[tuple[int, Chunk]], now: float) -> None:
        for event in events:
            if type(event) is rs.Send:
                self.pending.append(event.parts)
            elif type(event) is rs.Deliver:
                self._mux_events(self.mux.receive(event.data, now), deliver)
            elif type(event) is rs.PeerClosed:
                self.closing = True
            elif isinstance(event, rs.TunnelFailed | rs.PathLost | rs.PathFailed):
                raise TunnelError(f"the resume layer ended: {event!r}")

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self._resume_events(self.resume.close(time.monotonic()), [], time.monotonic())

    # -- threads ---------------------------------------------------------------

    def _collect(self, now: float) -> list[list[Buffer]]:
        """Under the lock: the resume messages to seal now (the timers' too)."""
        mux, resume = self.mux, self.resume
        deliver: list[tuple[int, Chunk]] = []
        due = resume.next_deadline
        if due is not None and now >= due:
            self._resume_events(resume.timer(now), deliver, now)
        due = mux.next_deadline
        if due is not None and now >= due:
            self._mux_events(mux.timer(now), deliver)
        if resume.state == "open" and not resume.writing_paused and mux.wants_to_send:
            parts, events = mux.data_to_send(now)
            if parts:  # before the events: StreamDone closes the tunnel
                self._resume_events(resume.send(parts, now), deliver, now)
            self._mux_events(events, deliver)
        sends, self.pending = self.pending, []
        return sends

    def _flush(self) -> bool:
        """Seal and send what is due, in the order the resume layer numbered it
        (the seal lock is taken before the machines' lock, never after)."""
        with self.seal_lock:
            with self.cond:
                sends = self._collect(time.monotonic())
            for message in sends:
                for view in self.record.seal(message):  # reused by the next seal
                    self.sock.sendall(view)
        return bool(sends)

    def _reader(self) -> None:
        """Local reads into the mux, sealed and sent by this thread (no hand-off)."""
        local, cond, mux = self.local, self.cond, self.mux
        assert local is not None
        sid = self.sid
        while True:
            data = local.recv(READ)
            with cond:
                if self.failed or self.closing:
                    return
                if data:
                    mux.send(sid, data)
                else:
                    mux.end_stream(sid)
            self._flush()
            if not data:
                return
            with cond:
                while not mux.writable(sid) and not self.failed:
                    self.writable.wait()

    def _writer(self) -> None:
        """What the reader does not send: credit, ACKs, data unblocked by credit, timers."""
        cond, mux, resume = self.cond, self.mux, self.resume
        while True:
            while self._flush():
                pass
            with cond:
                if self.failed:
                    return
                if self.pending or (mux.wants_to_send and resume.state == "open"
                                    and not resume.writing_paused):
                    continue
                if not self.closing:
                    now = time.monotonic()
                    deadlines = [d for d in (resume.next_deadline, mux.next_deadline)
                                 if d is not None]
                    at = min(deadlines) if deadlines else None
                    resume.armed(at)
                    resume.rearm = False
                    cond.wait(None if at is None else max(0.0, at - now))
                    continue
            with self.seal_lock, contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)  # after CLOSE
            return

    def _receiver(self) -> None:
        cond, record, sock = self.cond, self.record, self.sock
        events: list[rm.RecordEvent] = self.early
        while True:
            deliver: list[tuple[int, Chunk]] = []
            with cond:
                now = time.monotonic()
                for event in events:
                    if type(event) is rm.RecordReceived:
                        self._resume_events(
                            self.resume.receive(self.path, event.plaintext, now), deliver, now)
                    elif type(event) is rm.ChannelFailed:
                        raise TunnelError(f"records: {event.error}")
                    elif type(event) is rm.ChannelEnded:
                        self.closing = True
                if self.pending or self.mux.wants_to_send or self.resume.rearm \
                        or self.closing:
                    cond.notify_all()
            opened = deliver and self.local is None
            if opened:
                assert self.service is not None
                self.local = socket.create_connection(self.service, timeout=10)
                self.local.settimeout(None)
                _nodelay(self.local)
                self._spawn(self._reader)
            credit = 0
            for _sid, data in deliver:
                assert self.local is not None
                if data is None:
                    self.local.shutdown(socket.SHUT_WR)
                else:
                    self.local.sendall(data)
                    credit += len(data)
            if credit:
                with cond:
                    if self.mux.consumed(self.sid, credit):
                        cond.notify_all()
            view = record.get_buffer(-1)
            n = sock.recv_into(view)
            del view
            events = record.buffer_updated(n) if n else record.connection_lost(None)
            if not n and not events:
                return


def _accepted(conn: socket.socket, near: bool, to: tuple[str, int]) -> None:
    _nodelay(conn)
    try:
        if near:
            sock = socket.create_connection(to, timeout=10)
            _nodelay(sock)
            tunnel = Tunnel(sock, "client", conn, None)
        else:
            tunnel = Tunnel(conn, "server", None, to)
        tunnel.handshake()
    except (OSError, HandshakeFailed) as exc:
        print(f"pump_layers: set-up: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        conn.close()
        return
    tunnel.run()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pump_layers",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("end", choices=("near", "far"))
    ap.add_argument("--listen", required=True, help="HOST:PORT (port 0: any)")
    ap.add_argument("--to", required=True, help="HOST:PORT: far end (near) or service (far)")
    args = ap.parse_args(argv)
    _keep_freed_memory()  # as the tunnel's process does
    listen = socket.create_server(_parse_addr(args.listen), backlog=128)
    name = listen.getsockname()
    print(f"listening {name[0]}:{name[1]}", flush=True)
    near, to = args.end == "near", _parse_addr(args.to)
    while True:
        conn, _ = listen.accept()
        threading.Thread(target=_accepted, args=(conn, near, to),
                         name="layers-conn", daemon=True).start()


if __name__ == "__main__":
    main()
