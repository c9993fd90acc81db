"""The local side of a session on real loopback sockets: the client's listener, and the
warning for one that other machines reach."""

from __future__ import annotations

import socket

import pytest

from nopf_web.sessions.errors import LocalPortInUse
from nopf_web.sessions.local import exposure, listen_local
from tests.lab.fixtures import LabFactory
from tests.programs import free_port


@pytest.mark.lab
def test_every_address_in_ipv6_form_takes_ipv4_too(lab_factory: LabFactory) -> None:
    # In a namespace whose IPv6 sockets default to IPv6 only (Windows' default, and
    # Linux's with this sysctl), [::] must still take IPv4 connections.
    host = lab_factory("none", "none").a1
    host.run(["sysctl", "-qw", "net.ipv6.bindv6only=1"])
    with host.enter():
        with socket.socket(socket.AF_INET6) as plain:
            assert plain.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = free_port()
        with listen_local("::", port) as listener:
            assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass


def test_an_ipv6_loopback_listener_is_ipv6() -> None:
    port = free_port("::1")
    with listen_local("::1", port) as listener:
        assert listener.family == socket.AF_INET6
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_busy_port_and_a_foreign_address_are_one_line_each() -> None:
    with listen_local("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(LocalPortInUse, match=f"^local port {port} is already in use on "
                           "127.0.0.1: choose another --localport$"):
            listen_local("127.0.0.1", port)
    with pytest.raises(LocalPortInUse, match=r"^cannot listen on 192\.0\.2\.1:3010: not an "
                       "address of this machine$"):
        listen_local("192.0.2.1", 3010)  # TEST-NET-1: no machine's own address


@pytest.mark.parametrize("host, warned", [
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.5", True),
])
def test_only_a_listener_off_loopback_is_warned_about(host: str, warned: bool) -> None:
    warning = exposure(host, 3010)
    assert (warning is not None) == warned
    if warning is not None:
        assert warning.startswith("listening on ") and "can use the tunnel too" in warning
