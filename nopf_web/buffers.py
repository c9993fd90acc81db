"""``Buffer``: the bytes-like values the codecs, the protocol machines and their
drivers take, under one name (read-only use: a machine keeps ``bytes`` as given
and copies anything else it must keep), and :func:`unchanging`, which says when
a view may be kept as given too; :func:`unviewed`, which says when such a
buffer may be written again."""

from __future__ import annotations

import sys
from collections.abc import Sequence
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


def unviewed(buffers: Sequence[bytearray], index: int) -> bool:
    """No view (nor other reference) of ``buffers[index]`` is left, so it may be
    written again. Every memoryview of a bytearray holds one reference to it,
    however many slices share it; unviewed, it is referred to by the sequence
    and by getrefcount's argument only. (A test of the reference count, not a
    one-byte resize that a view refuses: a refused resize raises, and a raise
    per viewed buffer cost microseconds on every local read.)"""
    return sys.getrefcount(buffers[index]) == 2
