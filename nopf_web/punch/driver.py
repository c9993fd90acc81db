"""The punch driver: carries out the machine's actions with real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nopf_web.sockets import (
    DEFAULT_TTL,
    TCP_SYN_RECV,
    ignore_syn_errors,
    reusable_socket,
    set_ttl,
    start_connect,
    tcp_state,
    wait_connected,
)

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

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM,
                errno.EHOSTDOWN, errno.ENETDOWN}


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
    task: asyncio.Task[None]


@dataclass
class PunchDriver:
    """Run one punch from ``local`` to ``peer``; :meth:`run` returns the connected socket."""

    local: tuple[str, int]
    peer: tuple[str, int]
    tactic: Tactic
    config: PunchConfig = field(default_factory=PunchConfig)
    nat_hint: str | None = None
    on_attempt: Callable[[int, int | None], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _attempts: dict[int, _Attempt] = field(default_factory=dict)

    async def run(self) -> socket.socket:
        peer_text = f"{self.peer[0]}:{self.peer[1]}"
        machine = PunchMachine(self.tactic, self.config, peer_text, nat_hint=self.nat_hint)
        listener: socket.socket | None = None
        accept: asyncio.Task[socket.socket] | None = None
        if self.tactic is Tactic.ARM:
            listener = reusable_socket(*self.local)
            listener.listen(4)
            accept = asyncio.create_task(self._accept_peer(listener), name="punch-listener")
        try:
            result = self._apply(machine, machine.start(self.clock()))
            while result is None:
                wake = machine.wake_at
                assert wake is not None
                pending: set[asyncio.Future[Any]] = {a.task for a in self._attempts.values()}
                if accept is not None:
                    pending.add(accept)
                timeout = max(0.0, wake - self.clock())
                if pending:
                    done, _ = await asyncio.wait(pending, timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                else:  # between attempts, nothing to watch but the clock
                    done = set()
                    await asyncio.sleep(timeout)
                if accept is not None and accept in done:
                    accepted = accept.result()
                    self._apply(machine, machine.accepted(self.clock()))
                    return accepted
                actions: list[PunchAction] = []
                for attempt_id, attempt in list(self._attempts.items()):
                    if attempt.task not in done:
                        continue
                    exc = attempt.task.exception()
                    now = self.clock()
                    if exc is None:
                        actions += machine.connected(attempt_id, now)
                    elif isinstance(exc, OSError):
                        actions += machine.failed(attempt_id, classify(exc), now)
                    else:
                        raise exc
                if not actions and not done:
                    actions = machine.timer(self.clock(), handshaking=self._handshaking(machine))
                result = self._apply(machine, actions)
            return result
        finally:
            for attempt_id in list(self._attempts):
                self._abandon(attempt_id)
            if accept is not None:
                accept.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await accept
            if listener is not None:
                listener.close()

    async def _accept_peer(self, listener: socket.socket) -> socket.socket:
        """Accept the peer's IP only; any port, so a peer behind a symmetric NAT
        (whose port we cannot know) still reaches us when we have no NAT."""
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(listener)
            if addr[0] == self.peer[0]:
                return conn
            conn.close()

    def _handshaking(self, machine: PunchMachine) -> bool:
        current = self._attempts.get(machine.attempts)
        return current is not None and tcp_state(current.sock) == TCP_SYN_RECV

    def _apply(self, machine: PunchMachine, actions: list[PunchAction]) -> socket.socket | None:
        for action in actions:
            if isinstance(action, StartAttempt):
                self._fire(machine, action)
            elif isinstance(action, Abandon):
                self._abandon(action.attempt)
            elif isinstance(action, Succeed) and action.attempt != ACCEPTED:
                attempt = self._attempts.pop(action.attempt)
                attempt.task.add_done_callback(_consume)
                ignore_syn_errors(attempt.sock, None)
                return attempt.sock
            elif isinstance(action, GiveUp):
                raise action.error
        return None

    def _fire(self, machine: PunchMachine, action: StartAttempt) -> None:
        sock = reusable_socket(*self.local)
        if self.on_attempt is not None:
            self.on_attempt(action.attempt, action.ttl)
        try:
            if action.ttl is not None:
                set_ttl(sock, action.ttl)
                # An ICMP error about this SYN (expired on the way, or the peer's
                # NAT refusing it before the peer's SYN left) must not kill the
                # socket that the peer's SYN may be about to reach.
                ignore_syn_errors(sock, action.ttl)
            start_connect(sock, self.peer)
            if action.ttl is not None:
                # Only the first SYN is short-lived; the SYN-ACK we may send must arrive.
                set_ttl(sock, DEFAULT_TTL)
        except OSError as exc:
            sock.close()
            # Report asynchronously through a finished task, like any other failure.
            self._attempts[action.attempt] = _Attempt(sock, _failed_task(exc, action.attempt))
            return
        task = asyncio.create_task(wait_connected(sock), name=f"punch-attempt-{action.attempt}")
        self._attempts[action.attempt] = _Attempt(sock, task)

    def _abandon(self, attempt_id: int) -> None:
        attempt = self._attempts.pop(attempt_id, None)
        if attempt is None:
            return
        attempt.task.cancel()
        attempt.task.add_done_callback(_consume)
        with contextlib.suppress(OSError, ValueError):
            # Unregister before close so a reused fd number is never confused.
            asyncio.get_running_loop().remove_writer(attempt.sock.fileno())
        with contextlib.suppress(OSError):
            attempt.sock.close()


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _failed_task(exc: OSError, attempt: int) -> asyncio.Task[None]:
    async def fail() -> None:
        raise exc

    return asyncio.create_task(fail(), name=f"punch-attempt-{attempt}-failed")


async def punch(
    local: tuple[str, int], peer: tuple[str, int], tactic: Tactic,
    config: PunchConfig | None = None, nat_hint: str | None = None,
) -> socket.socket:
    return await PunchDriver(local, peer, tactic, config or PunchConfig(), nat_hint).run()
