"""Server-sent events for a live session page: the wire format, and what changed.

Wire format (``text/event-stream``, UTF-8, as WHATWG HTML "Server-sent events"
defines it; each line ends in ``\\n``, each event in an empty line)::

    retry: 2000                  once, first: the browser's reconnection delay (ms)
    event: <name>                the value (or ``line``/``end``) this event carries
    data: <html line>            one ``data:`` line per line of the fragment
    id: <state token>            what the page shows once this event is applied
    : keepalive                  a comment, sent after a quiet spell (proxies, timeouts)

Each event's data is a small HTML fragment: a value's new markup for the
element with ``sse-swap="<name>"`` (see :data:`nopf_web.web.live.PARTS`), one
new event-log ``line`` (``<li>``), or ``end`` (data: the outcome), the last
event: the session has ended and its final values are sent.

The state token (the SSE ``id``, also the page's ``?since=``) is base64url,
no padding, of::

    layout  2 bytes   BLAKE2b of the part names, so a token of another layout is ignored
    mark    8 bytes   BLAKE2b of the newest event-log entry shown; zeros: none yet
    hashes  6 bytes   per part, in order: BLAKE2b of the HTML shown

A reconnecting browser sends it back as ``Last-Event-ID``, so a stream never
re-sends what the page already shows, without any state kept on the server
between connections. Nothing here does I/O: the handler in ``live.py`` feeds
it the current values and writes what it returns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

LINE: Final = "line"  # a new event-log line
END: Final = "end"  # the stream's last event
RETRY_MS: Final = 2000
HASH_SIZE: Final = 6
MARK_SIZE: Final = 8
LAYOUT_SIZE: Final = 2
_NO_MARK: Final = bytes(MARK_SIZE)
_NEWLINE: Final = re.compile(r"\r\n|\r|\n")  # the format's line ends


class LogEntry(Protocol):
    """An event-log entry: a live session's ``Event`` or a stored ``EventRow``."""

    @property
    def at(self) -> float: ...
    @property
    def kind(self) -> str: ...
    @property
    def message(self) -> str: ...


def _digest(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def entry_mark(entry: LogEntry) -> bytes:
    return _digest(f"{entry.at!r}\0{entry.kind}\0{entry.message}", MARK_SIZE)


def encode_event(name: str, data: str, event_id: str | None = None) -> bytes:
    """One event; ``data`` may span lines (the browser joins them with ``\\n``)."""
    out = [f"event: {name}\n"]
    out += [f"data: {line}\n" for line in _NEWLINE.split(data)]
    if event_id is not None:
        out.append(f"id: {event_id}\n")
    out.append("\n")
    return "".join(out).encode()


def encode_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def encode_retry(ms: int) -> bytes:
    return f"retry: {ms}\n\n".encode()


@dataclass(frozen=True)
class Message:
    """An event to send: its name, its HTML, and the state token once it is applied."""

    name: str
    data: str
    token: str

    def encode(self) -> bytes:
        return encode_event(self.name, self.data, self.token)


@dataclass
class LiveState:
    """What one page shows: a hash per part and the newest event-log entry.

    :meth:`update` compares it with the current values and returns only what
    differs, in order: changed parts first, then each new log entry once.
    """

    names: tuple[str, ...]
    hashes: dict[str, bytes] = field(default_factory=dict)
    mark: bytes = _NO_MARK
    # The entry ``mark`` stands for, once seen in the log: found again by identity.
    _last: object | None = None

    @classmethod
    def from_token(cls, names: Sequence[str], token: str | None) -> LiveState:
        """The state a token describes; an empty one (send everything) if it is not valid."""
        state = cls(tuple(names))
        if not token:
            return state
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return state
        if len(raw) != LAYOUT_SIZE + MARK_SIZE + HASH_SIZE * len(names) \
                or raw[:LAYOUT_SIZE] != state._layout():
            return state
        state.mark = raw[LAYOUT_SIZE:LAYOUT_SIZE + MARK_SIZE]
        body = raw[LAYOUT_SIZE + MARK_SIZE:]
        state.hashes = {name: body[i * HASH_SIZE:(i + 1) * HASH_SIZE]
                        for i, name in enumerate(state.names)}
        return state

    def _layout(self) -> bytes:
        return _digest(",".join(self.names), LAYOUT_SIZE)

    def token(self) -> str:
        missing = bytes(HASH_SIZE)
        raw = self._layout() + self.mark + b"".join(self.hashes.get(name, missing)
                                                    for name in self.names)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def update(self, parts: Mapping[str, str], log: Sequence[LogEntry],
               render_line: Callable[[LogEntry], str | None]) -> list[Message]:
        """The events that bring the page from this state to ``parts`` and ``log``.

        ``log`` is the whole current log, oldest first, as a bounded deque holds
        it: entries may have left at its start since the last call. An entry
        ``render_line`` renders as None is counted as seen but not sent.
        """
        out: list[Message] = []
        for name in self.names:
            html = parts[name]
            digest = _digest(html, HASH_SIZE)
            if self.hashes.get(name) != digest:
                self.hashes[name] = digest
                out.append(Message(name, html, self.token()))
        for entry in self._new_entries(log):
            self.mark, self._last = entry_mark(entry), entry
            line = render_line(entry)
            if line is not None:
                out.append(Message(LINE, line, self.token()))
        return out

    def _new_entries(self, log: Sequence[LogEntry]) -> Sequence[LogEntry]:
        if self.mark == _NO_MARK:
            return log
        # By identity first (cheap); by content if the log's entries are new objects.
        for by_identity in (True, False) if self._last is not None else (False,):
            for i in range(len(log) - 1, -1, -1):
                entry = log[i]
                if entry is self._last if by_identity else entry_mark(entry) == self.mark:
                    return [log[j] for j in range(i + 1, len(log))]
        # The newest entry shown has left the log: everything in it is newer.
        return log
