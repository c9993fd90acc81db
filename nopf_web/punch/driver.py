"""The punch driver: carries out the machine's actions with real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nopf_web.sockets import (
    DEFAULT_TTL,
    SYN_ERRORS_NOTICE,
    TCP_SYN_RECV,
    ignore_syn_errors,
    require_readiness,
    reset_close,
    reusable_socket,
    set_ttl,
    start_connect,
    syn_error_shield,
    tcp_state,
    wait_connected,
)
from nopf_web.wire.address import Endpoint

from .machine import (
    ACCEPTED,
    Abandon,
    Failure,
    GiveUp,
    PunchAction,
    PunchConfig,
    PunchMachine,
    StartAttempt,
    Succeed,
    Tactic,
)

log = logging.getLogger("nopf.punch")

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM,
                errno.EHOSTDOWN, errno.ENETDOWN}


def answer_of(exc: OSError) -> tuple[str, str]:
    """What came back to a SYN that failed, for the timeline: (answer, detail). The
    kernel reports an ICMP error as an errno; its name is as precise as it gets
    without IP_RECVERR (which would also turn soft errors into hard ones)."""
    if exc.errno == errno.ECONNREFUSED:
        return "rst", "connection refused (TCP reset)"
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if exc.errno in _UNREACHABLE:
        return "icmp", f"ICMP error: {name} ({exc.strerror or exc})"
    if exc.errno == errno.ETIMEDOUT:
        return "nothing", "timed out"
    return "other", f"{name}: {exc.strerror or exc}"


def classify(exc: OSError) -> Failure:
    if exc.errno == errno.ECONNREFUSED:
        return Failure.REFUSED
    if exc.errno in _UNREACHABLE:
        return Failure.UNREACHABLE
    if exc.errno == errno.ETIMEDOUT:
        return Failure.SILENT
    return Failure.OTHER


@dataclass
class _Attempt:
    sock: socket.socket
    task: asyncio.Task[None] | None  # None: it failed before its SYN left


@dataclass(frozen=True)
class _Connected:
    attempt: int


@dataclass(frozen=True)
class _Failed:
    attempt: int
    error: OSError


@dataclass(frozen=True)
class _Accepted:
    sock: socket.socket


@dataclass(frozen=True)
class _Clipped:
    """The peer's SYN came before the attempt's first-SYN TTL was restored."""

    attempt: int


_Outcome = _Connected | _Failed | _Accepted | _Clipped


@dataclass
class PunchDriver:
    """Run one punch from ``local`` to ``peer``; :meth:`run` returns the connected socket.

    Every attempt (and the ARM tactic's listener) is a child task of one TaskGroup
    that reports how it ended into a queue; the loop feeds those outcomes and the
    machine's timer to the machine and carries out its actions.

    ``on_notice`` gets one line, once, when this system cannot shield a low-TTL
    SYN from ICMP errors (see :func:`nopf_web.sockets.syn_error_shield`); without
    it the line is logged.
    """

    local: tuple[str, int]
    peer: tuple[str, int]
    tactic: Tactic
    config: PunchConfig = field(default_factory=PunchConfig)
    nat_hint: str | None = None
    on_attempt: Callable[[int, int | None], None] | None = None
    # What came back to each attempt's SYN: (attempt, answer, detail), answer one of
    # "syn-ack", "rst", "icmp", "nothing" (replaced or given up silent), "accepted"
    # (our listener took the peer: attempt 0), "clipped" (our SYN-ACK left with the
    # arming TTL), "other".
    on_answer: Callable[[int, str, str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    on_notice: Callable[[str], None] | None = None
    noticed: bool = False  # the SYN_ERRORS_NOTICE was given
    _attempts: dict[int, _Attempt] = field(default_factory=dict)
    _outcomes: asyncio.Queue[_Outcome] = field(default_factory=asyncio.Queue)
    _tasks: asyncio.TaskGroup | None = None
    _answered: set[int] = field(default_factory=set)

    async def run(self) -> socket.socket:
        require_readiness()  # one line, before any socket, on a Proactor loop
        peer_text = str(Endpoint(*self.peer))
        machine = PunchMachine(self.tactic, self.config, peer_text, nat_hint=self.nat_hint)
        listener: socket.socket | None = None
        failure: Exception | None = None
        result: socket.socket | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                accept: asyncio.Task[None] | None = None
                if self.tactic is Tactic.ARM:
                    listener = reusable_socket(*self.local)
                    listener.listen(4)
                    accept = tasks.create_task(self._accept_peer(listener),
                                               name="punch-listener")
                try:
                    result = await self._loop(machine)
                except Exception as exc:  # raised as itself below, not in an ExceptionGroup
                    failure = exc
                finally:
                    for attempt_id in list(self._attempts):
                        self._abandon(attempt_id)
                    if accept is not None:
                        accept.cancel()
            if failure is not None:
                raise failure
            assert result is not None
            return result
        finally:
            self._tasks = None
            if listener is not None:
                listener.close()
            while not self._outcomes.empty():  # a peer accepted as we gave up
                outcome = self._outcomes.get_nowait()
                if isinstance(outcome, _Accepted):
                    outcome.sock.close()

    async def _loop(self, machine: PunchMachine) -> socket.socket:
        result = self._apply(machine, machine.start(self.clock()))
        while result is None:
            wake = machine.wake_at
            assert wake is not None
            try:
                async with asyncio.timeout(max(0.0, wake - self.clock())):
                    outcome = await self._outcomes.get()
            except TimeoutError:
                result = self._apply(machine, machine.timer(
                    self.clock(), handshaking=self._handshaking(machine)))
                continue
            if isinstance(outcome, _Accepted):
                self._answer(ACCEPTED, "accepted", "the peer connected to our listener")
                self._apply(machine, machine.accepted(self.clock()))
                return outcome.sock
            if outcome.attempt not in self._attempts:
                continue  # abandoned after it ended: its socket is closed already
            if isinstance(outcome, _Connected):
                self._answer(outcome.attempt, "syn-ack", "connected")
                actions = machine.connected(outcome.attempt, self.clock())
            elif isinstance(outcome, _Clipped):
                actions = machine.clipped(outcome.attempt, self.clock())
            else:
                self._answer(outcome.attempt, *answer_of(outcome.error))
                actions = machine.failed(outcome.attempt, classify(outcome.error), self.clock())
            result = self._apply(machine, actions)
        return result

    async def _accept_peer(self, listener: socket.socket) -> None:
        """Accept the peer's IP only; any port, so a peer behind a symmetric NAT
        (whose port we cannot know) still reaches us when we have no NAT."""
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(listener)
            if addr[0] == self.peer[0]:
                self._outcomes.put_nowait(_Accepted(conn))
                return
            conn.close()

    async def _attempt(self, attempt: int, sock: socket.socket) -> None:
        try:
            await wait_connected(sock)
        except OSError as exc:
            self._outcomes.put_nowait(_Failed(attempt, exc))
        else:
            self._outcomes.put_nowait(_Connected(attempt))

    def _handshaking(self, machine: PunchMachine) -> bool:
        current = self._attempts.get(machine.attempts)
        return current is not None and tcp_state(current.sock) == TCP_SYN_RECV

    def _apply(self, machine: PunchMachine, actions: list[PunchAction]) -> socket.socket | None:
        for action in actions:
            if isinstance(action, StartAttempt):
                self._fire(machine, action)
            elif isinstance(action, Abandon):
                if action.attempt in self._attempts and action.attempt not in self._answered:
                    if action.clipped:
                        self._answer(action.attempt, "clipped", "the peer's SYN came as the "
                                     "first SYN's TTL was restored; no ACK followed our SYN-ACK")
                    else:
                        self._answer(action.attempt, "nothing", "no answer in time")
                self._abandon(action.attempt)
            elif isinstance(action, Succeed) and action.attempt != ACCEPTED:
                attempt = self._attempts.pop(action.attempt)
                ignore_syn_errors(attempt.sock, None)
                return attempt.sock
            elif isinstance(action, GiveUp):
                raise action.error
        return None

    def _fire(self, machine: PunchMachine, action: StartAttempt) -> None:
        assert self._tasks is not None
        sock = reusable_socket(*self.local)
        if self.on_attempt is not None:
            self.on_attempt(action.attempt, action.ttl)
        clipped = False
        try:
            if action.ttl is not None:
                set_ttl(sock, action.ttl)
                # An ICMP error about this SYN (expired on the way, or the peer's
                # NAT refusing it before the peer's SYN left) must not kill the
                # socket that the peer's SYN may be about to reach.
                if not ignore_syn_errors(sock, action.ttl):
                    self._notice_unshielded()
            start_connect(sock, self.peer)
            if action.ttl is not None:
                # Only the first SYN is short-lived; the SYN-ACK we may send must arrive.
                set_ttl(sock, DEFAULT_TTL)
                # Mid-handshake already: the peer's SYN came first, and was answered
                # with the short TTL (the machine decides whether that matters).
                clipped = tcp_state(sock) == TCP_SYN_RECV
        except OSError as exc:
            sock.close()
            # Reported through the queue, like any other failure.
            self._attempts[action.attempt] = _Attempt(sock, None)
            self._outcomes.put_nowait(_Failed(action.attempt, exc))
            return
        task = self._tasks.create_task(self._attempt(action.attempt, sock),
                                       name=f"punch-attempt-{action.attempt}")
        self._attempts[action.attempt] = _Attempt(sock, task)
        if clipped:
            self._outcomes.put_nowait(_Clipped(action.attempt))

    def _answer(self, attempt: int, answer: str, detail: str) -> None:
        self._answered.add(attempt)
        if self.on_answer is not None:
            self.on_answer(attempt, answer, detail)

    def _notice_unshielded(self) -> None:
        if self.noticed or syn_error_shield() != "exposed":
            return  # told once; or the system never aborts a connect on ICMP (Windows)
        self.noticed = True
        if self.on_notice is not None:
            self.on_notice(SYN_ERRORS_NOTICE)
        else:
            log.warning("%s", SYN_ERRORS_NOTICE)

    def _abandon(self, attempt_id: int) -> None:
        attempt = self._attempts.pop(attempt_id, None)
        if attempt is None:
            return
        if attempt.task is not None:
            attempt.task.cancel()  # the TaskGroup awaits it
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            # Unregister before close so a reused fd number is never confused.
            asyncio.get_running_loop().remove_writer(attempt.sock.fileno())
        with contextlib.suppress(OSError):
            if self.config.arm_ttl and tcp_state(attempt.sock) == TCP_SYN_RECV:
                # A failed half-open handshake: an RST the guard lets pass, as far as
                # the arming SYN goes, ends our NAT's tracking of it and frees the
                # address pair (machine docstring). Without an arming TTL it would
                # reach the peer: a plain close then, as ever.
                reset_close(attempt.sock, self.config.arm_ttl)
            else:
                attempt.sock.close()


async def punch(
    local: tuple[str, int], peer: tuple[str, int], tactic: Tactic,
    config: PunchConfig | None = None, nat_hint: str | None = None,
) -> socket.socket:
    return await PunchDriver(local, peer, tactic, config or PunchConfig(), nat_hint).run()
