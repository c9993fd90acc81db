"""Local reads' slabs, sealed in place: the same records as sealing a copy, never
written while anything views them, and a pool that stays bounded."""

from __future__ import annotations

import os

from hypothesis import given, strategies as st

from nopf_web.buffers import Buffer
from nopf_web.tunnel import mux_machine as mm, record_machine as rm, resume_machine as rs
from nopf_web.tunnel.slab import HEADROOM, Slab, SlabPool

from .budget import FEW
from .record_peers import ready_pair


def _slab_of(data: bytes) -> tuple[Slab, memoryview]:
    """A slab holding ``data`` as a read, and its view (what the stream queues)."""
    slab = Slab(max(len(data), 1))
    slab.room()[: len(data)] = data
    return slab, slab.view(len(data))


# -- the slab and the pool ---------------------------------------------------------


def test_the_pool_hands_out_a_slab_only_once_nothing_views_it() -> None:
    """Any view holds a slab (a slice of a view too, as the mux's split makes);
    so does any other reference, which is why the test keeps only ids."""
    pool = SlabPool(1024, keep=2)
    first = id(pool.take())
    assert id(pool.take()) == first  # nothing refers to it: the same slab again
    view = pool.take().view(1000)  # the stream's data
    part = view[10:]  # the replay buffer's entry, a slice
    del view
    assert id(pool.take()) != first and pool.made == 3  # (the scratch is one)
    del part  # acknowledged: the entry is dropped
    assert id(pool.take()) == first and pool.made == 3


def test_the_pool_lends_a_bounded_number_of_slabs_then_gives_its_scratch() -> None:
    """A peer that does not ack (or many bulk streams): once every slab it may lend
    is viewed, the pool says so, and a read that comes all the same goes into the
    scratch slab, which the forwarder copies out of; the pool never makes more
    slabs, however long that lasts."""
    pool = SlabPool(4096, keep=3)
    views = [pool.take().view(4096) for _ in range(3)]
    assert pool.made == 4 and pool.kept == 3  # the three and the scratch
    assert not pool.has_free()  # the forwarder reads into asyncio's bytes meanwhile
    for _ in range(5):
        assert pool.take() is pool.scratch
    kept = {id(v.obj) for v in views}
    assert id(pool.scratch) not in kept
    views.pop()  # one acknowledged: lent again
    assert pool.has_free() and id(pool.take()) in kept and pool.made == 4


def test_a_small_read_leaves_its_slab_free_for_the_next_read() -> None:
    """The forwarder copies a read under ``lend_min`` out of the slab (so a few
    bytes never pin a whole slab): the pool hands the same slab out again."""
    pool = SlabPool(4096)
    assert pool.lend_min == 2048
    slab = pool.take()
    slab.room()[:5] = b"hello"
    data = bytes(slab.room()[:5])  # what _Local.buffer_updated does below lend_min
    first = id(slab)
    del slab  # the forwarder lets go of it
    assert data == b"hello" and id(pool.take()) == first and pool.made == 2


# -- sealing in place ----------------------------------------------------------------


headers = st.lists(st.binary(min_size=1, max_size=120), max_size=4)


@FEW
@given(heads=headers, size=st.sampled_from([1, 100, 65_536, 256 * 1024]),
       records=st.integers(1, 3))
def test_sealing_in_place_gives_the_records_a_copy_gives(heads: list[bytes], size: int,
                                                         records: int) -> None:
    """Byte for byte the records of the same bytes sealed from a copy (headers that
    do not fit the headroom and key updates take the copying path), and the peer
    opens them to exactly those bytes; the read itself never changes."""
    limits = rm.KeyLimits(records=2)  # a key update every two records
    in_place, peer = ready_pair(limits=limits)
    copying, _ = ready_pair(limits=limits)
    assert in_place.m.sealing is not None
    copying.m.sealing = rm.SealingKey(in_place.m.sealing._key)
    for _ in range(records):
        data = os.urandom(size)
        slab, view = _slab_of(data)
        sealing = in_place.m.sealing
        assert sealing is not None
        due = sealing.due(limits)
        wire = b"".join(in_place.seal([*heads, view]))
        assert wire == b"".join(copying.seal([*heads, bytes(data)]))
        assert bytes(view) == data
        head = b"".join(heads)
        if not due and len(head) <= HEADROOM:  # the in-place path: headers in the headroom
            assert bytes(slab[HEADROOM - len(head) : HEADROOM]) == head
        before = len(peer.plain)
        peer.feed(wire)
        assert bytes(peer.plain[before:]) == b"".join(heads) + data


def test_a_whole_read_is_sealed_in_place_behind_its_headers() -> None:
    a, b = ready_pair()
    data = os.urandom(256 * 1024)
    slab, view = _slab_of(data)
    (record,) = a.seal([b"resume header", b"mux header", view])
    assert bytes(slab[HEADROOM - 23 : HEADROOM]) == b"resume headermux header"
    b.feed(record)
    assert b.records == [b"resume headermux header" + data]


def test_a_split_or_partial_view_is_sealed_from_a_copy() -> None:
    """Only a view of the whole read has the headroom before it; a part of one (a
    frame cut by credit) goes the copying way and the headroom stays untouched."""
    a, b = ready_pair()
    data = os.urandom(1000)
    slab, view = _slab_of(data)
    b.feed(b"".join(a.seal([b"hdr", view[:500]])) + b"".join(a.seal([b"hdr", view[500:]])))
    assert b.records == [b"hdr" + data[:500], b"hdr" + data[500:]]
    assert bytes(slab[:HEADROOM]) == bytes(HEADROOM) and bytes(view) == data


def test_the_mux_and_the_resume_layer_keep_a_slab_view_uncopied() -> None:
    mux, resume = mm.MuxMachine(role="client"), rs.ResumeMachine("client")
    mux.start(0.0)
    resume.add_path("lan", 0.0, first=True)
    sid = mux.open_stream()
    mux.data_to_send(0.0)  # the OPEN frame
    _slab, view = _slab_of(os.urandom(1000))
    mux.send(sid, view)
    parts, _events = mux.data_to_send(0.0)
    assert parts[-1] is view
    (send,) = resume.send(parts, 0.0)
    assert isinstance(send, rs.Send) and send.parts[-1] is view
    # A view of a plain bytearray (which its owner may change) is copied by both.
    other = memoryview(bytearray(1000))
    mux.send(sid, other)
    parts, _events = mux.data_to_send(0.0)
    last: Buffer = parts[-1]
    assert last is not other and isinstance(last, memoryview) and type(last.obj) is bytes
    (send,) = resume.send([b"frame", other], 0.0)
    assert isinstance(send, rs.Send) and type(send.parts[-1]) is bytes
