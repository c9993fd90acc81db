"""TCP Fast Open to the rendezvous: the connector's hello rides in its SYN.

The rendezvous runs in-process in the lab's rdv host (so its counters can be
read); the host's ``net.ipv4.tcp_fastopen`` sysctl, set per namespace, decides
whether its kernel takes data in SYNs. Both ways the pairing must work: with
Fast Open off the client's SYN data is ignored and its kernel sends the hello
again after the handshake (the rendezvous accepts exactly one hello frame, so
a loss or a duplicate would fail the pairing).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from nopf_web.rendezvous.server import RendezvousServer, fastopen_hint
from nopf_web.tunnel.secure import Pake
from tests.lab import Host
from tests.lab.fixtures import LabFactory

from .coord_harness import RDV, exchange, handshake_rtt, pair

ON = "0x203"  # client, server, and data accepted without a cookie
OFF = "0x1"  # client only: the Linux default


@contextlib.contextmanager
def rendezvous_in(host: Host) -> Iterator[tuple[RendezvousServer, Callable[[], str | None]]]:
    """A RendezvousServer on RDV inside ``host``, run by a thread; yields it and a
    function that evaluates :func:`fastopen_hint` in the same namespace."""
    server = RendezvousServer("0.0.0.0", RDV[1])
    started = threading.Event()
    stop: list[Callable[[], None]] = []
    errors: list[BaseException] = []
    hint: list[str | None] = []

    async def main() -> None:
        await server.start()
        hint.append(fastopen_hint())
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(done.set)

        stop.append(wake)
        started.set()
        try:
            await asyncio.wait_for(done.wait(), 120)  # bounded even if the test hangs
        finally:
            await server.close()

    def body() -> None:
        try:
            with host.enter():
                asyncio.run(main())
        except BaseException as exc:  # reported to the test
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=body, name="rdv-in-process", daemon=True)
    thread.start()
    assert started.wait(10), "the in-process rendezvous did not start within 10 s"
    assert not errors, errors
    try:
        yield server, lambda: hint[0]
    finally:
        if stop:
            stop[0]()
        thread.join(15)
        assert not thread.is_alive(), "the in-process rendezvous did not stop within 15 s"


def _makers() -> tuple[Callable[[str], Pake], Callable[[str], Pake]]:
    def maker(role: Literal["A", "B"]) -> Callable[[str], Pake]:
        return lambda code: Pake("server" if role == "A" else "client", code)
    return maker("A"), maker("B")


@pytest.mark.lab
@pytest.mark.parametrize("tfo", ["on", "off"])
def test_coordinated_pairing_with_fast_open_on_and_off(lab_factory: LabFactory,
                                                       tfo: str) -> None:
    lab = lab_factory("rst", "drop", delay_ms=50)
    lab.rdv.run(["sysctl", "-qw", f"net.ipv4.tcp_fastopen={ON if tfo == 'on' else OFF}"])
    with rendezvous_in(lab.rdv) as (server, hint):
        rtt = handshake_rtt(lab.b1, RDV)
        out = pair(lab.a1, lab.b1, punch_timeout=10, pakes=_makers())
        try:
            assert out.ok, out.errors
            assert out.sharer is not None and out.joiner is not None
            exchange(out.sharer, out.joiner)
            # A SYN with data crossed the joiner's NAT: the rendezvous saw its public address.
            assert out.joiner.public.host == lab.b.public_ip
            assert out.sharer.peer.host == lab.b.public_ip
            assert out.joiner.peer.host == lab.a.public_ip
            assert server.stats.paired == 1 and server.stats.coordinated == 2
            t = out.joiner.timings
            hello_to_fire = t.fire - t.started
            if tfo == "on":
                assert hint() is None
                # The kernel flagged the accepted socket: the hello came in the SYN.
                assert server.stats.syn_data == 1
                # Fire after one round trip (SYN+hello there, SYN-ACK+fire back),
                # not two; the margin is for CPU noise.
                assert hello_to_fire < 1.6 * rtt, (hello_to_fire, rtt)
            else:
                assert hint() is not None
                assert server.stats.syn_data == 0
                assert hello_to_fire > 1.6 * rtt, (hello_to_fire, rtt)
        finally:
            out.close()


@pytest.mark.parametrize(("value", "off"), [("1", True), ("0x3", True), ("0x203", False),
                                             ("0x202", False), ("0", True), ("junk", False)])
def test_fastopen_hint_names_the_sysctl_value_to_set(tmp_path: Path, value: str,
                                                     off: bool) -> None:
    path = tmp_path / "tcp_fastopen"
    path.write_text(value + "\n")
    hint = fastopen_hint(str(path))
    if off:
        assert hint is not None and hint.startswith("TCP Fast Open is off on this host")
        assert f"net.ipv4.tcp_fastopen={int(value, 0) | 0x202:#x}" in hint
    else:
        assert hint is None  # on, or unreadable: nothing to say
