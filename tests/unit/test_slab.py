"""Read slabs sealed in place: the same records as sealing a copy, and never
reused while anything views them."""

from __future__ import annotations

import os

from hypothesis import given, strategies as st

from nopf_web.tunnel import mux_machine as mm, record_machine as rm, resume_machine as rs
from nopf_web.tunnel.slab import HEADROOM, MAX_FREE, MAX_TRACKED, Slab, SlabPool

from .budget import FEW

CODE = "7-orbit-lantern"


def _open_pair(limits: rm.KeyLimits = rm.DEFAULT_KEY_LIMITS
               ) -> tuple[rm.RecordMachine, rm.RecordMachine]:
    a = rm.RecordMachine.handshake("client", CODE, limits=limits)
    b = rm.RecordMachine.handshake("server", CODE, limits=limits)
    wire = {id(a): b"", id(b): b""}
    for m in (a, b):
        wire[id(m)] = b"".join(e.data for e in m.start(0.0) if isinstance(e, rm.Transmit))
    for _ in range(2):
        for src, dst in ((a, b), (b, a)):
            data, wire[id(src)] = wire[id(src)], b""
            wire[id(dst)] += b"".join(e.data for e in dst.receive_data(data)
                                      if isinstance(e, rm.Transmit))
    assert a.confirmed and b.confirmed
    return a, b


def _slab_of(data: bytes) -> Slab:
    slab = Slab(max(len(data), 1))
    slab.room()[: len(data)] = data
    slab.filled = len(data)
    return slab


# -- the pool ---------------------------------------------------------------------------


def test_a_slab_is_in_use_exactly_while_a_view_of_it_exists() -> None:
    slab = _slab_of(b"abc")
    size = len(slab)
    assert not slab.in_use() and len(slab) == size
    view = slab.view()
    part = view[1:]  # a slice of a view (as the mux's split makes) holds it too
    del view
    assert slab.in_use()
    del part
    assert not slab.in_use() and len(slab) == size


def test_the_pool_reuses_a_lent_slab_only_once_nothing_views_it() -> None:
    pool = SlabPool(1024)
    slab = pool.take()
    slab.filled = 1000
    kept = slab.view()  # the replay buffer's entry
    pool.lend(slab)
    other = pool.take()
    assert other is not slab and pool.made == 2
    del kept  # acknowledged: the entry is dropped
    assert pool.take() is slab and pool.made == 2


def test_the_pool_bounds_what_it_tracks_and_keeps() -> None:
    pool = SlabPool(16)
    views = []
    for _ in range(MAX_TRACKED + 5):
        slab = pool.take()
        slab.filled = 1
        views.append(slab.view())
        pool.lend(slab)
    assert len(pool._lent) == MAX_TRACKED
    for _ in range(MAX_FREE + 3):
        pool.give_back(Slab(16))
    assert len(pool._free) == MAX_FREE


# -- sealing in place -------------------------------------------------------------------


headers = st.lists(st.binary(min_size=1, max_size=120), max_size=4)


@FEW
@given(heads=headers, size=st.sampled_from([1, 100, 65_536, 256 * 1024]),
       records=st.integers(1, 3))
def test_sealing_in_place_gives_the_records_a_copy_gives(heads: list[bytes], size: int,
                                                         records: int) -> None:
    """Byte for byte the records of the same bytes sealed from copies (headers that
    do not fit the headroom and key updates fall back to the copy), and the peer
    opens them to exactly those bytes; the read itself is never changed."""
    limits = rm.KeyLimits(records=2)  # a key update every two records
    a_slab, peer = _open_pair(limits)
    a_copy, _ = _open_pair(limits)
    a_copy.sealing = rm.SealingKey(a_slab.sealing._key)  # type: ignore[union-attr]
    a_copy._secrets = a_slab._secrets
    for _ in range(records):
        data = os.urandom(size)
        slab = _slab_of(data)
        parts: list[rm.Buffer] = [*heads, slab.view()]
        wire = b"".join(bytes(r) for r in a_slab.seal(parts))
        expected = b"".join(bytes(r) for r in a_copy.seal([*heads, bytes(data)]))
        assert wire == expected
        assert bytes(slab.view()) == data
        opened = [e for e in peer.receive_data(wire) if isinstance(e, rm.RecordReceived)]
        assert b"".join(e.plaintext for e in opened) == b"".join(heads) + data


def test_a_whole_read_is_sealed_in_place_behind_its_headers() -> None:
    a, peer = _open_pair()
    data = os.urandom(256 * 1024)
    slab = _slab_of(data)
    (record,) = a.seal([b"resume header", b"mux header", slab.view()])
    assert bytes(slab[HEADROOM - 23 : HEADROOM]) == b"resume headermux header"
    (opened,) = peer.receive_data(bytes(record))
    assert isinstance(opened, rm.RecordReceived)
    assert opened.plaintext == b"resume headermux header" + data


def test_a_split_or_partial_view_is_sealed_from_a_copy() -> None:
    a, peer = _open_pair()
    data = os.urandom(1000)
    slab = _slab_of(data)
    view = slab.view()
    wire = b"".join(bytes(r) for r in a.seal([b"hdr", view[:500]]))
    wire += b"".join(bytes(r) for r in a.seal([b"hdr", view[500:]]))
    opened = [e.plaintext for e in peer.receive_data(wire) if isinstance(e, rm.RecordReceived)]
    assert opened == [b"hdr" + data[:500], b"hdr" + data[500:]]
    assert bytes(slab.view()) == data


def test_the_mux_and_the_resume_layer_keep_a_slab_view_uncopied() -> None:
    mux, resume = mm.MuxMachine(role="client"), rs.ResumeMachine("client")
    mux.start(0.0)
    resume.add_path("lan", 0.0, first=True)
    sid = mux.open_stream()
    mux.data_to_send()  # the OPEN frame
    slab = _slab_of(os.urandom(1000))
    view = slab.view()
    mux.send(sid, view)
    parts, _events = mux.data_to_send()
    assert parts[-1] is view
    (send,) = resume.send(parts, 0.0)
    assert isinstance(send, rs.Send) and send.parts[-1] is view
    # A view of a plain bytearray (which its owner could change) is copied.
    other = memoryview(bytearray(1000))
    mux.send(sid, other)
    parts, _events = mux.data_to_send()
    assert parts[-1] is not other and type(parts[-1].obj) is bytes  # type: ignore[union-attr]
