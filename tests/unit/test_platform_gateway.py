"""Default-gateway discovery where there is no /proc/net/route: the output of macOS'
``route -n get default`` and Windows' ``route print -4 0.0.0.0`` parsed, and the
one-line error where neither is known."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from nopf_web.portmap import NoGatewayError
from nopf_web.portmap.client import (
    gateway_from_route_command,
    parse_route_get,
    parse_route_print,
    route_command,
)

MACOS_ROUTE_GET = """\
   route to: default
destination: default
       mask: default
    gateway: 192.168.1.254
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""

MACOS_VPN_ROUTE_GET = """\
   route to: default
destination: default
       mask: default
  interface: utun4
      flags: <UP,DONE,STATIC,PRCLONING,GLOBAL>
"""

WINDOWS_ROUTE_PRINT = """\
===========================================================================
Interface List
 12...00 15 5d 01 02 03 ......Intel(R) Ethernet Connection
  7...0a 00 27 00 00 07 ......VirtualBox Host-Only Ethernet Adapter
  1...........................Software Loopback Interface 1
===========================================================================

IPv4 Route Table
===========================================================================
Active Routes:
Network Destination        Netmask          Gateway       Interface  Metric
          0.0.0.0          0.0.0.0      192.168.0.1    192.168.0.23     35
          0.0.0.0          0.0.0.0       10.20.0.1      10.20.0.57     25
          0.0.0.0          0.0.0.0         On-link      172.16.5.9      5
===========================================================================
Persistent Routes:
  Network Address          Netmask  Gateway Address  Metric
          0.0.0.0          0.0.0.0      192.168.9.9  Default
===========================================================================
"""

# Labels translated (a German Windows): only the numbers are read.
WINDOWS_ROUTE_PRINT_DE = """\
IPv4-Routentabelle
===========================================================================
Aktive Routen:
     Netzwerkziel    Netzwerkmaske          Gateway    Schnittstelle Metrik
          0.0.0.0          0.0.0.0     192.168.178.1   192.168.178.20     50
===========================================================================
Ständige Routen:
  Keine
"""


def test_macos_route_get() -> None:
    assert parse_route_get(MACOS_ROUTE_GET) == IPv4Address("192.168.1.254")
    assert parse_route_get(MACOS_VPN_ROUTE_GET) is None  # the route names an interface
    assert parse_route_get("gateway: fe80::1%en0\n") is None  # not IPv4
    assert parse_route_get("") is None


def test_windows_route_print_picks_the_lowest_metric_gateway() -> None:
    # 10.20.0.1 (metric 25) beats 192.168.0.1 (35); On-link and persistent rows are skipped.
    assert parse_route_print(WINDOWS_ROUTE_PRINT) == IPv4Address("10.20.0.1")
    assert parse_route_print(WINDOWS_ROUTE_PRINT_DE) == IPv4Address("192.168.178.1")
    assert parse_route_print("Active Routes:\n  None\n") is None


def test_route_commands_per_system() -> None:
    assert route_command("darwin") == ["/sbin/route", "-n", "get", "default"]
    win = route_command("win32")
    assert win is not None and win[0].lower().endswith(r"\system32\route.exe")
    assert win[1:] == ["print", "-4", "0.0.0.0"]
    assert route_command("linux") is None  # /proc/net/route is read instead


def test_an_unknown_system_says_to_give_the_gateway() -> None:
    with pytest.raises(NoGatewayError) as caught:
        gateway_from_route_command("sunos5")
    assert "give the gateway's address" in str(caught.value)
    assert "\n" not in str(caught.value)
