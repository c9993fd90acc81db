"""nopf-server on both families: one port, the seed's reply on IPv4, the IPv6 reply on IPv6."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.wire.discovery import REPLY6_SIZE, DiscoveryReader, decode_reply, decode_reply6
from tests.loopback import has_ipv6_loopback, read_until_close
from tests.programs import argv, free_port, serving

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too

needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")


@needs_ipv6
async def test_one_port_both_families() -> None:
    server = RendezvousServer(("127.0.0.1", "::1"), 0)
    await server.start()
    try:
        (h4, p4), (h6, p6) = server.addresses
        assert (h4, h6) == ("127.0.0.1", "::1") and p4 == p6 != 0
        data, port = await read_until_close(("127.0.0.1", p4))
        assert decode_reply(data) == ("127.0.0.1", port)  # the seed's 10 bytes, unchanged
        data, port = await read_until_close(("::1", p6))
        assert len(data) == REPLY6_SIZE  # then, with no hello, the close (as over IPv4)
        assert decode_reply6(data) == ("::1", port)
        assert server.stats.served == 2
    finally:
        await server.close()


def test_ipv6_reply_codec_rejects_garbage() -> None:
    reader = DiscoveryReader(ipv6=True)
    assert reader.needed == 22
    with pytest.raises(ValueError, match="trailer"):
        reader.feed(bytes(18) + b"END!")


@needs_ipv6
def test_program_listens_on_both_families_by_default() -> None:
    port = free_port()
    with serving("nopf-server", "--port", str(port), "--no-doctor") as stderr:
        line = stderr.readline()
        assert f"listening on 0.0.0.0:{port}, [::]:{port}" in line, line
        data, local = asyncio.run(read_until_close(("::1", port)))
        assert decode_reply6(data) == ("::1", local)
        data, local = asyncio.run(read_until_close(("127.0.0.1", port)))
        assert decode_reply(data) == ("127.0.0.1", local)


def test_program_host_option_is_repeatable_and_exclusive() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--host", "127.0.0.2",
                 "--port", str(port), "--no-doctor") as stderr:
        line = stderr.readline()
        assert line.strip().endswith(f"listening on 127.0.0.1:{port}, 127.0.0.2:{port}"), line
    bad = subprocess.run(argv("nopf-server", "--host", "example.org"), capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 2 and "--host 'example.org' is not an IP address" in bad.stderr
