"""``Buffer``: the bytes-like values the codecs, the protocol machines and their
drivers take, under one name (read-only use: a machine keeps ``bytes`` as given
and copies anything else it must keep), and :func:`unchanging`, which says when
a view may be kept as given too."""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview


def unchanging(view: memoryview) -> bool:
    """``view`` is of a buffer nobody changes while it is viewed: ``bytes``, or a
    type that says so with ``UNCHANGING_WHILE_VIEWED`` (the tunnel's reused
    buffers, which are written again only once no view of them is left:
    :class:`nopf_web.tunnel.record_machine.PlainSlot` for opened records and
    :class:`nopf_web.tunnel.slab.Slab` for local reads). Such a view may be kept
    as given, as ``bytes`` are, where anything else must be copied."""
    owner = type(view.obj)
    return owner is bytes or getattr(owner, "UNCHANGING_WHILE_VIEWED", False) is True
