"""The drivers' attributes read through to their machines or counters (``Delegated``):
each names an attribute its holder really has, reads its value and cannot be set."""

from __future__ import annotations

import pytest

from nopf_web.delegated import Delegated
from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.doctor_machine import ResponderMachine
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.rendezvous.server_machine import ServerMachine
from nopf_web.sessions.seed import SeedEngine
from nopf_web.tunnel.mux import Mux, Stream
from nopf_web.tunnel.mux_machine import MuxMachine, StreamState
from nopf_web.tunnel.pipe import Counters
from nopf_web.tunnel.record_machine import RecordMachine
from nopf_web.tunnel.secure import SecureChannel

CODE = "7-orbit-lantern"


def delegated(cls: type) -> dict[str, Delegated[object]]:
    return {name: value for name, value in vars(cls).items() if isinstance(value, Delegated)}


@pytest.mark.parametrize(("driver", "holder"), [
    (Mux, MuxMachine(role="server", keepalive=7.0, dead_after=21.0, name="mux-x")),
    (Stream, StreamState(1, 65536)),
    (SecureChannel, RecordMachine.handshake("client", CODE)),
    (RendezvousServer, ServerMachine()),
    (DoctorResponder, ResponderMachine()),
    (SeedEngine, Counters()),
])
def test_every_delegated_attribute_exists_on_its_holder(driver: type, holder: object) -> None:
    attrs = delegated(driver)
    assert attrs, driver
    for name, attr in attrs.items():
        assert attr.holder in ("_machine", "_state", "counters"), name
        assert hasattr(holder, attr.attribute), f"{driver.__name__}.{name} -> {attr.attribute}"


def test_delegated_reads_the_holder_and_cannot_be_set() -> None:
    class Holder:
        _machine = MuxMachine(role="client", keepalive=7.0, dead_after=21.0, name="mux-x")
        keepalive = Delegated[float]("_machine")
        seconds = Delegated[float]("_machine", "dead_after", doc="until dead")

    holder = Holder()
    assert (holder.keepalive, holder.seconds) == (7.0, 21.0)
    assert Holder.seconds.__doc__ == "until dead"
    with pytest.raises(AttributeError, match="read-only"):
        holder.keepalive = 1.0
    assert holder.keepalive == 7.0
