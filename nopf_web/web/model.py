"""One shape for a session on a page or in JSON, whether live (in memory) or from history.

:class:`SessionView` is the history's :class:`~nopf_web.db.SessionRecord` plus what
only a running session has (its share token, rates, the packet guard); a live
one is made from its engine's :class:`~nopf_web.sessions.engine.Snapshot`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

from nopf_web.db import SessionRecord, SessionRow
from nopf_web.wire.address import LOCAL_HOST, Endpoint, is_loopback, local_listing

from .manager import CODE_LIFETIME, ManagedSession


@dataclass(frozen=True)
class SessionView(SessionRecord):
    live: bool = False
    share_token: str | None = None
    rate_in: float = 0.0
    rate_out: float = 0.0
    guard: dict[str, Any] | None = None  # {"active", "reason", "dropped"} (seed mode)
    guard_dropped: int = 0
    resuming: bool = False  # coordinated: the path was lost, a new one is being found
    path_changes: int = 0  # coordinated: moves to another path so far

    @classmethod
    def from_managed(cls, ms: ManagedSession, now: float | None = None) -> SessionView:
        s = ms.session.snapshot()
        rate_in, rate_out = ms.rates(time.time() if now is None else now, s)
        return cls(
            id=ms.id, role=s.role, local_port=s.local_port, rendezvous=str(s.rendezvous),
            label=ms.label, state=s.state.value, outcome=ms.outcome,
            public_address=str(s.public_address) if s.public_address else None,
            peer_address=str(s.peer_address) if s.peer_address else None,
            bytes_in=s.bytes_in, bytes_out=s.bytes_out, connections=s.connections,
            error=ms.error or s.error, hint=ms.hint, started_at=s.started_at,
            ended_at=s.ended_at, mode=s.mode, code=s.code, path=s.path, live=ms.live,
            share_token=ms.share_token, rate_in=rate_in, rate_out=rate_out,
            guard=dataclasses.asdict(s.guard) if s.guard is not None else None,
            guard_dropped=s.guard_dropped, resuming=s.resuming, path_changes=s.path_changes,
            predicted_path=s.prediction.path if s.prediction else None,
            prediction=s.prediction.why if s.prediction else None, nat_pair=s.nat_pair,
            setup_ms=s.setup_ms,
            timeline=json.dumps(list(s.timeline), separators=(",", ":")) if s.timeline else None,
            local_host=s.local_host, more_local=" ".join(str(side) for side in s.more_local),
        )

    @classmethod
    def from_row(cls, row: SessionRow) -> SessionView:
        return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(SessionRecord)})

    @property
    def status(self) -> str:
        """What a badge shows: the outcome once ended, else the engine state."""
        return self.outcome or self.state

    @property
    def elapsed(self) -> float:
        end = self.ended_at if self.ended_at is not None else time.time()
        return max(0.0, end - self.started_at)

    @functools.cached_property  # parsed once per view (a page renders it several times)
    def timeline_marks(self) -> list[dict[str, Any]]:
        """The pairing's timeline (see ``nopf_web.sessions.timeline``); [] if none."""
        if not self.timeline:
            return []
        try:
            marks = json.loads(self.timeline)
        except ValueError:
            return []
        return [m for m in marks if isinstance(m, dict)] if isinstance(marks, list) else []

    @property
    def first_path(self) -> str | None:
        """The pairing's path (its timeline's), else the path now; None: none yet."""
        first = next((m.get("path") for m in self.timeline_marks if m.get("kind") == "path"),
                     None)
        return str(first) if first else self.path

    @property
    def prediction_held(self) -> bool | None:
        """Whether the first path taken is the predicted one (None: not known yet)."""
        first = self.first_path
        if self.predicted_path is None or (first is None and self.outcome is None):
            return None
        return first == self.predicted_path or (first is None
                                                and self.predicted_path == "none")

    @property
    def can_set_peer(self) -> bool:
        return self.mode == "seed" and self.live and self.peer_address is None

    @property
    def invite(self) -> str | None:
        """What a sharer sends its peer, while its code waits to be used."""
        if (self.mode != "coordinated" or self.role != "server" or not self.code
                or not self.live or self.state != "waiting_peer"):
            return None
        # templates/_session_parts.html shows the same words with markup.
        text = (f"Join my nopf share: run nopf connect {self.code} {self.invite_ports} -a "
                f"{self.rendezvous} ({self.invite_ports_words}), or start a client session in "
                f"your nopf dashboard with the code {self.code}{self.invite_dashboard_words}. "
                f"The code works once, within {self.code_minutes} minutes.")
        if self.rendezvous_local:
            text += f" {self.local_rendezvous_words}"
        return text

    @property
    def invite_ports(self) -> str:
        """``-p PORT``, once per service the sharer shares."""
        return " ".join(["-p PORT"] * len(self.local_sides))

    @property
    def invite_ports_words(self) -> str:
        n = len(self.local_sides)
        return "PORT: any free local port" if n == 1 else \
            f"PORT: a free local port for each of the {n} services, in order"

    @property
    def invite_dashboard_words(self) -> str:
        n = len(self.local_sides)
        return "" if n == 1 else f" and {n} local ports, one per service"

    @property
    def rendezvous_local(self) -> bool:
        """The rendezvous is a loopback address: no peer on another machine reaches it."""
        return is_loopback(self.rendezvous.rpartition(":")[0])

    @property
    def local_rendezvous_words(self) -> str:
        return (f"Only from this machine: the rendezvous {self.rendezvous} is a loopback "
                "address, which a peer on another machine cannot reach.")

    @property
    def code_minutes(self) -> int:
        return round(CODE_LIFETIME / 60)

    @property
    def local_address(self) -> str:
        """The (first) local side as HOST:PORT: the service (server), or where
        applications connect (client)."""
        return str(Endpoint(self.local_host, self.local_port))

    @property
    def local_sides(self) -> list[str]:
        """Every local side as HOST:PORT, in service order (several: coordinated only)."""
        return [self.local_address, *self.more_local.split()]

    @property
    def local_listing(self) -> str:
        """The local sides in a sentence (:func:`~nopf_web.wire.address.local_listing`)."""
        return local_listing(self.local_sides)

    @property
    def local_is_default(self) -> bool:
        """Every local side is on 127.0.0.1, as a bare port puts it."""
        return all(side.rpartition(":")[0] == LOCAL_HOST for side in self.local_sides)

    @property
    def local_short(self) -> list[str]:
        """Every local side as the *Local port* field takes it: a bare port on the
        default host, else HOST:PORT."""
        return [side.rpartition(":")[2] if side.rpartition(":")[0] == LOCAL_HOST else side
                for side in self.local_sides]

    @property
    def local_words(self) -> str:
        """``port 3000`` on the default host, else ``192.168.1.20:80`` (``ports 22,
        192.168.1.20:80`` for several): how a list names the local side."""
        short = self.local_short
        if len(short) == 1:
            return f"port {short[0]}" if self.local_is_default else short[0]
        return "ports " + ", ".join(short)

    def again_form(self, default_rendezvous: str) -> dict[str, str]:
        """The new-session form filled in as this session was made (a code is used
        once: never carried over; the default rendezvous stays empty)."""
        return {"role": self.role, "mode": self.mode, "local_port": ", ".join(self.local_short),
                "rendezvous": "" if self.rendezvous == default_rendezvous else self.rendezvous,
                "label": self.label, "code": ""}

    @property
    def title(self) -> str:
        return self.label or f"{self.role} session on {self.local_words}"

    def to_json(self, base_url: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "mode": self.mode,
            "code": self.code,
            "invite": self.invite,
            "path": self.path,
            "resuming": self.resuming,
            "local_port": self.local_port,
            "local_host": self.local_host,
            "more_local": self.more_local.split(),
            "rendezvous": self.rendezvous,
            "label": self.label,
            "state": self.state,
            "outcome": self.outcome,
            "live": self.live,
            "public_address": self.public_address,
            "peer_address": self.peer_address,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rate_in": round(self.rate_in, 1),
            "rate_out": round(self.rate_out, 1),
            "connections": self.connections,
            "share_url": f"{base_url}/s/{self.share_token}" if self.share_token else None,
            "error": self.error,
            "hint": self.hint,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "prediction": None if self.predicted_path is None else {
                "path": self.predicted_path, "why": self.prediction,
                "held": self.prediction_held},
            "nat_pair": self.nat_pair,
            "setup_ms": self.setup_ms,
            "timeline": self.timeline_marks,
        }
