"""``Buffer``: the bytes-like values the codecs, the protocol machines and their
drivers take, under one name (read-only use: a machine keeps ``bytes`` as given
and copies anything else it must keep)."""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
