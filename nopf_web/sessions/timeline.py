"""The timeline of one pairing attempt, as the coordinated driver saw it: pure data.

The driver (:mod:`nopf_web.sessions.coordination`) adds a :class:`Mark` where it
already sees things happen — the rendezvous connection, the fire, each punch
stage, each SYN (attempt number, TTL) and what came back to it (a SYN-ACK, a
reset, which ICMP error the kernel reported, nothing), a retry, the path chosen
and the setup time — and the session's history keeps :meth:`Timeline.to_json`.
The punch machine stays as it was: these are facts its driver observes.

JSON (a list, in order; ``t_ms`` from the pairing's start, 0.1 ms resolution):

    {"t_ms": 12.5, "kind": K, "text": "one line", ...details}

Kinds: ``start``, ``rendezvous`` (connected; ``rtt_ms``: its TCP handshake),
``fire`` (``attempt``, ``rtt_ms`` the peer round trip the rendezvous estimated,
``prediction`` on the first), ``retry`` (a new coordination after a failed
attempt), ``stage`` (a rung's path starts: ``path``, ``tactic``, ``budget_s``),
``syn`` (``attempt``, ``ttl``: null = the system's), ``answer`` (``attempt``,
``answer``: ``syn-ack``, ``rst``, ``icmp``, ``nothing``, ``accepted``, ``clipped``, ``other``;
``detail``), ``stage_failed``, ``path`` (the tunnel's path; ``setup_ms``: from the start for a
joiner, from its first fire for a sharer, whose wait for a peer is no setup),
``failed`` (why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

MAX_MARKS: Final = 400  # a 30 s punch sends ~60 SYNs per stage; keep the history row small
ANSWERS: Final = ("syn-ack", "rst", "icmp", "nothing", "accepted", "clipped", "other")


@dataclass(frozen=True)
class Mark:
    at: float  # the driver's monotonic clock
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timeline:
    """Marks in order; ``origin``: the pairing's start on the same clock."""

    origin: float
    marks: list[Mark] = field(default_factory=list)
    dropped: int = 0  # marks past MAX_MARKS, counted, not kept

    def add(self, at: float, kind: str, text: str, **data: Any) -> None:
        if len(self.marks) >= MAX_MARKS and kind not in ("path", "failed"):
            self.dropped += 1
            return
        self.marks.append(Mark(at, kind, text, data))

    def since(self, at: float) -> float:
        """Milliseconds from the origin to ``at``."""
        return round((at - self.origin) * 1000, 1)

    def to_json(self) -> list[dict[str, Any]]:
        out = [{"t_ms": self.since(m.at), "kind": m.kind, "text": m.text, **m.data}
               for m in self.marks]
        if self.dropped:
            out.append({"t_ms": out[-1]["t_ms"] if out else 0.0, "kind": "note",
                        "text": f"{self.dropped} more marks not kept"})
        return out


def summary(marks: list[dict[str, Any]]) -> dict[str, Any]:
    """What the statistics read from a kept timeline: SYNs sent, answers by kind, the
    attempts (coordinations), the setup time (ms, None if no path)."""
    answers: dict[str, int] = {}
    for m in marks:
        if m.get("kind") == "answer":
            answer = str(m.get("answer"))
            answers[answer] = answers.get(answer, 0) + 1
    setup = next((m.get("setup_ms") for m in marks if m.get("kind") == "path"), None)
    return {"syns": sum(1 for m in marks if m.get("kind") == "syn"), "answers": answers,
            "attempts": sum(1 for m in marks if m.get("kind") == "fire"),
            "setup_ms": setup}
