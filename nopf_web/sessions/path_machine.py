"""When a coordinated tunnel meets its peer again, as a pure machine.

The resumable channel (:mod:`nopf_web.tunnel.resumable`) watches each path and
says when it needs a new one; this machine decides which *meetings* (a
:func:`~nopf_web.sessions.coordination.meet_again` through the rendezvous, then
the new connection added to the channel) the engine runs, and when:

- **resume**: the path carrying the tunnel was lost (``NeedPath``). One meeting
  at a time, the punch then the relay, each bounded by what is left of the
  resume budget; a failed one is retried after ``resume_retry`` (1 s), until the
  budget ends (then the channel fails the tunnel itself, naming what was tried).
- **upgrade**: while the tunnel runs over the relay, a ``direct_only`` meeting
  (punch stages only, ``upgrade_timeout`` for the punch) at ``upgrade_delays``
  after the relay was selected, each counted from the previous attempt's start:
  5, 10, 20, 30, 30... s (``upgrade_cap``). Both peers keep the same schedule
  from about the same instant, so their meetings pair at the rendezvous (the
  first waits there for the other). The leader selects a direct path that
  authenticates, and the channel closes the relay connection after the switch.

No sockets, no event loop, no clock of its own: every input takes ``now``.
Inputs: :meth:`PathMachine.selected`, :meth:`~PathMachine.lost`,
:meth:`~PathMachine.need`, :meth:`~PathMachine.met` (a meeting's outcome),
:meth:`~PathMachine.timer` at :attr:`~PathMachine.next_deadline`,
:meth:`~PathMachine.stop`. Outputs: :class:`Meet` (start a meeting),
:class:`Cancel` (stop a meeting that has not reached the tunnel yet: the driver
lets one whose connection is already in the tunnel's path handshake finish),
:class:`Report` (a line for the event log).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nopf_web.tunnel.resume_machine import PathKind

UPGRADE_DELAYS: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0)
UPGRADE_CAP = 30.0  # never longer between two tries of a direct path
# The punch budget of an upgrade meeting: a direct path that can be punched is up
# within a few round trips (the ladder gives a punch before the relay 3 s + 4 RTT).
UPGRADE_TIMEOUT = 5.0
RESUME_RETRY = 1.0  # s between resume meetings (a rendezvous that is down, restarting)
MEET_TIMEOUT = 30.0  # a resume meeting's plan budget (at most what the resume budget has left)

_DIGITS = re.compile(r"\d+(\.\d+)?")
MeetingKind = Literal["resume", "upgrade"]
ReportKind = Literal["lost", "resumed", "upgraded", "resume_failed", "upgrade_failed"]


@dataclass(frozen=True)
class Meet:
    """Run meeting ``attempt``: meet the peer through the rendezvous (``direct_only``:
    punch stages only), ``timeout`` as the plan's budget, and add the new connection
    to the tunnel. ``deadline``: it must be over by then (None: its own limits).
    Report the outcome with :meth:`PathMachine.met`."""

    attempt: int
    kind: MeetingKind
    direct_only: bool
    timeout: float
    deadline: float | None


@dataclass(frozen=True)
class Cancel:
    """Stop meeting ``attempt`` unless its connection is already being added; its
    outcome is reported all the same (``cancelled``)."""

    attempt: int


@dataclass(frozen=True)
class Report:
    """A line for the event log (``kind`` says which news it is)."""

    kind: ReportKind
    text: str


PathAction = Meet | Cancel | Report


def backoff(first: float, cap: float = UPGRADE_CAP) -> tuple[float, ...]:
    """Upgrade delays from ``first``, doubling up to ``cap``: 5 -> (5, 10, 20, 30)."""
    if first <= 0:
        raise ValueError("the first delay must be positive")
    delays = [min(first, cap)]
    while delays[-1] < cap:
        delays.append(min(delays[-1] * 2, cap))
    return tuple(delays)


def seconds(value: float) -> str:
    """A duration for people: "1.2 s" below 10 s, "31 s" above."""
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def describe_kind(kind: str) -> str:
    return {"relay": "the relay", "lan": "the LAN"}.get(kind, f"the {kind} path")


@dataclass
class _Running:
    attempt: int
    kind: MeetingKind
    started: float


class PathMachine:
    """One tunnel's meetings after its first path; see the module docstring.

    ``kind``: the path the tunnel started on, at ``now`` (its first path was
    confirmed). ``resume_budget`` is the channel's (a resume meeting never
    outlives it).
    """

    def __init__(self, kind: PathKind, now: float, *, resume_budget: float,
                 upgrade_delays: tuple[float, ...] = UPGRADE_DELAYS,
                 upgrade_cap: float = UPGRADE_CAP, upgrade_timeout: float = UPGRADE_TIMEOUT,
                 resume_retry: float = RESUME_RETRY, meet_timeout: float = MEET_TIMEOUT) -> None:
        if not upgrade_delays or min(upgrade_delays) <= 0 or upgrade_cap <= 0:
            raise ValueError("upgrade delays and their cap must be positive")
        if resume_budget <= 0 or upgrade_timeout <= 0 or resume_retry <= 0:
            raise ValueError("the resume budget, upgrade timeout and retry must be positive")
        self.resume_budget = resume_budget
        self.upgrade_delays = tuple(min(d, upgrade_cap) for d in upgrade_delays)
        self.upgrade_cap = upgrade_cap
        self.upgrade_timeout = upgrade_timeout
        self.resume_retry = resume_retry
        self.meet_timeout = meet_timeout
        self.kind: PathKind | None = kind  # the path carrying the tunnel (None: lost)
        self.stopped = False
        self._attempts = 0
        self._running: _Running | None = None
        self._next_at: float | None = None  # the next meeting's start
        self._relay_since: float | None = None
        self._upgrade_step = 0
        self._lost_at: float | None = None
        self._lost_kind: PathKind | None = None
        self._resume_tries = 0
        self._last_failure = ""  # the last failure reported (a repeat is not reported again)
        if kind == "relay":
            self._on_relay(now)

    # -- observation ------------------------------------------------------------------

    @property
    def running(self) -> MeetingKind | None:
        return self._running.kind if self._running is not None else None

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`timer` must be called next (None: on an input only)."""
        if self.stopped or self._running is not None:
            return None
        return self._next_at

    @property
    def deadline(self) -> float | None:
        """Where the tunnel is being resumed: when the resume budget ends."""
        return None if self._lost_at is None else self._lost_at + self.resume_budget

    # -- the channel's news -----------------------------------------------------------

    def selected(self, kind: PathKind, previous: PathKind | None, after: float | None,
                 now: float) -> list[PathAction]:
        """The tunnel runs over a ``kind`` path now (``after``: seconds since the
        previous one was lost, None for a move without a loss)."""
        if self.stopped:
            return []
        actions: list[PathAction] = []
        was_relay_since = self._relay_since
        if self._lost_at is not None:
            took = after if after is not None else now - self._lost_at
            tries = f" ({self._resume_tries} tries)" if self._resume_tries > 1 else ""
            actions.append(Report("resumed", f"resumed over {describe_kind(kind)} in "
                                  f"{seconds(took)}{tries}"))
        elif previous == "relay" and kind != "relay":
            since = now - was_relay_since if was_relay_since is not None else 0.0
            actions.append(Report("upgraded", f"back to direct ({kind}) after {seconds(since)} "
                                  "over the relay"))
        self.kind = kind
        self._lost_at = self._lost_kind = None
        self._resume_tries = 0
        self._last_failure = ""
        if kind == "relay":
            self._on_relay(now)
        else:
            self._relay_since = None
            self._next_at = None
            if self._running is not None and self._running.kind == "upgrade":
                actions.append(Cancel(self._running.attempt))  # direct already
        return actions

    def lost(self, kind: PathKind, why: str, silent_for: float, timed_out: bool,
             now: float) -> list[PathAction]:
        """The path carrying the tunnel broke (the channel's ``PathLost``)."""
        if self.stopped:
            return []
        self.kind = None
        self._relay_since = None
        if self._lost_at is None:
            self._lost_at, self._lost_kind = now, kind
            self._resume_tries = 0
        self._next_at = None
        how = f"no answer for {seconds(silent_for)}" if timed_out else why
        actions: list[PathAction] = [Report(
            "lost", f"{describe_kind(kind)} was lost ({how}); resuming through the rendezvous")]
        if self._running is not None and self._running.kind == "upgrade":
            actions.append(Cancel(self._running.attempt))  # a full meeting is needed now
        return actions

    def need(self, now: float) -> list[PathAction]:
        """No connection carries the tunnel and none is on its way (``NeedPath``)."""
        if self.stopped:
            return []
        if self._lost_at is None:  # not announced by a loss (a candidate failed)
            self._lost_at, self._lost_kind = now, self.kind
            self._resume_tries = 0
        self.kind = None
        self._relay_since = None
        if self._running is not None or (self._next_at is not None and self._next_at > now):
            return []  # the meeting running (or the retry due) covers it
        return self._start("resume", now)

    # -- meetings ---------------------------------------------------------------------

    def met(self, attempt: int, now: float, *, error: str | None = None,
            cancelled: bool = False) -> list[PathAction]:
        """Meeting ``attempt`` ended: its connection joined the tunnel (no ``error``,
        not ``cancelled``), or it failed (``error``, one line) or was cancelled."""
        running = self._running
        if running is None or running.attempt != attempt:
            return []
        self._running = None
        if self.stopped:
            return []
        joined = error is None and not cancelled
        actions: list[PathAction] = []
        if self.kind is None:  # resuming, whatever this meeting was for
            if joined:
                return []  # the leader selects it (or NeedPath comes again)
            if running.kind == "upgrade":
                return self._start("resume", now)  # it stopped (or failed) for the loss
            assert self._lost_at is not None
            wait = self.resume_retry
            left = self._lost_at + self.resume_budget - now
            if error is not None and self._news(error) and left > wait:
                actions.append(Report("resume_failed", f"resume attempt failed: {error} "
                                      f"(retrying in {seconds(wait)})"))
            self._next_at = now + wait
            return actions
        if self.kind != "relay":
            return []  # direct already: nothing more to do
        if running.kind == "resume":  # it ended after the relay was selected: try direct later
            since = self._relay_since if self._relay_since is not None else now
            self._next_at = max(now, since + self.upgrade_delays[0])
            return []
        # An upgrade that joined keeps the schedule too, until the leader's choice shows.
        self._upgrade_step += 1
        step = self._upgrade_step
        delay = self.upgrade_delays[step] if step < len(self.upgrade_delays) \
            else self.upgrade_cap
        self._next_at = max(now, running.started + delay)
        if error is not None and self._news(error):
            wait = self._next_at - now
            when = f"next try in {seconds(wait)}" if wait >= 0.05 else "trying again now"
            actions.append(Report("upgrade_failed", f"no direct path yet: {error} ({when})"))
        return actions

    def timer(self, now: float) -> list[PathAction]:
        """Start the meeting that is due."""
        if self.stopped or self._running is not None or self._next_at is None \
                or now < self._next_at:
            return []
        if self.kind is None:
            return self._start("resume", now)
        if self.kind == "relay":
            return self._start("upgrade", now)
        self._next_at = None
        return []

    def stop(self) -> list[PathAction]:
        """The tunnel ended: cancel whatever runs, start nothing more."""
        if self.stopped:
            return []
        self.stopped = True
        self._next_at = None
        return [Cancel(self._running.attempt)] if self._running is not None else []

    # -- internals --------------------------------------------------------------------

    def _news(self, error: str) -> bool:
        """Whether a failure is worth a line: not the same as the last one said (numbers
        aside: ports and times differ from one try to the next)."""
        gist = _DIGITS.sub("#", error)
        if gist == self._last_failure:
            return False
        self._last_failure = gist
        return True

    def _on_relay(self, now: float) -> None:
        self._relay_since = now
        self._upgrade_step = 0
        if self._running is None:
            self._next_at = now + self.upgrade_delays[0]
        else:  # a meeting still running (its own path joined): try direct after it
            self._next_at = None

    def _start(self, kind: MeetingKind, now: float) -> list[PathAction]:
        self._attempts += 1
        self._running = _Running(self._attempts, kind, now)
        self._next_at = None
        if kind == "upgrade":
            return [Meet(self._attempts, "upgrade", True, self.upgrade_timeout, None)]
        self._resume_tries += 1
        deadline = self.deadline
        assert deadline is not None
        timeout = max(1.0, min(self.meet_timeout, deadline - now))
        return [Meet(self._attempts, "resume", False, timeout, deadline)]
