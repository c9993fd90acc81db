"""The encrypted tunnel's wire bytes for bulk data, rebuilt independently.

A guard for work on the hot path (fast paths, fewer copies): a stream's bytes,
through the mux, resume and record machines as the drivers chain them, must
come out as exactly the records the formats in their docstrings describe,
sealed here with ``cryptography`` directly, and the peer's machines must give
back exactly the bytes sent.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nopf_web.tunnel import mux_machine as mm, record_machine as rm, resume_machine as rs
from nopf_web.tunnel.slab import Slab
from nopf_web.wire import frames as fr

CODE = "7-orbit-lantern"


def _open_pair() -> tuple[rm.RecordMachine, rm.RecordMachine]:
    a, b = rm.RecordMachine.handshake("client", CODE), rm.RecordMachine.handshake("server", CODE)
    wire = {id(a): b"", id(b): b""}
    for m in (a, b):
        wire[id(m)] = b"".join(e.data for e in m.start(0.0) if isinstance(e, rm.Transmit))
    for _ in range(2):
        for src, dst in ((a, b), (b, a)):
            data, wire[id(src)] = wire[id(src)], b""
            out = b"".join(e.data for e in dst.receive_data(data)
                           if isinstance(e, rm.Transmit))
            wire[id(dst)] += out
    assert a.confirmed and b.confirmed
    return a, b


@pytest.mark.parametrize("reads_in", ["bytes", "slabs"])
def test_bulk_stream_records_are_exactly_the_documented_format(reads_in: str) -> None:
    """Reads as ``bytes``, or as the forwarder's slabs (sealed in place: the
    same records)."""
    sender, receiver = _open_pair()
    assert sender.sealing is not None
    key = sender.sealing._key  # the sending direction's record key (not public API)
    mux, resume = mm.MuxMachine(role="client"), rs.ResumeMachine("client")
    mux.start(0.0)
    path = resume.add_path("lan", 0.0, first=True)
    sid = mux.open_stream()
    mux._streams[sid].credit = 1 << 30  # the peer's credit, as WINDOW_UPDATEs would give
    reads = [os.urandom(256 * 1024), os.urandom(1000), os.urandom(256 * 1024)]
    wire = b""
    expected = b""
    first = True
    for seq, read in enumerate(reads):  # one record each: seq and nonce counter alike
        if reads_in == "slabs":
            slab = Slab(len(read))
            slab.room()[: len(read)] = read
            mux.send(sid, slab.view(len(read)))
        else:
            mux.send(sid, read)
        parts, _events = mux.data_to_send(0.0)
        (send,) = resume.send(parts, 0.0)
        assert isinstance(send, rs.Send) and send.path == path
        wire += b"".join(bytes(r) for r in sender.seal(send.parts))
        # Rebuilt: [the record-size announcement, OPEN] + DATA frame, in a resume DATA
        # message, in one record.
        hello = fr.encode_ping(fr.announce_records(fr.RECORD_BUDGET)) + fr.encode_open(sid)
        frames = (hello if first else b"") + fr.encode_data(sid, read)
        first = False
        message = struct.pack("!BQQ", rs.DATA, seq, 0) + frames
        header = struct.pack("!I", len(message) + rm.TAG_SIZE)  # type DATA (0), u24 length
        nonce = bytes(4) + struct.pack("!Q", seq)
        expected += header + AESGCM(key).encrypt(nonce, message, header)
    assert wire == expected

    # The peer's machines give back the stream's bytes, in order, exactly.
    peer_resume, peer_mux = rs.ResumeMachine("server"), mm.MuxMachine(role="server")
    peer_mux.start(0.0)
    peer_path = peer_resume.add_path("lan", 0.0, first=True)
    got = b""
    for event in receiver.receive_data(wire):
        assert isinstance(event, rm.RecordReceived)
        for delivered in peer_resume.receive(peer_path, event.plaintext, 0.0):
            if isinstance(delivered, rs.Deliver):
                for data in peer_mux.receive(delivered.data, 0.0):
                    if isinstance(data, mm.StreamData):
                        got += bytes(data.data)
                        peer_mux.consumed(sid, len(data.data))  # credit, as a reader gives
    assert got == b"".join(reads)
