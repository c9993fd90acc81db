"""A home gateway's port mapping services for the lab: NAT-PMP, PCP and UPnP-IGD.

Debian's miniupnpd refuses the lab's documentation-range WAN addresses, so this
small stdlib-only process stands in for it. It runs inside a NAT namespace of
the lab (``nata``/``natb``, started by :func:`start` through ``Host.popen``) and
really opens each mapped port: an nft DNAT rule on the WAN interface in its own
table ``ip nopf_gateway`` plus a forward accept inserted at the head of the
lab's ``ip nopf_lab forward`` chain, both removed on delete, on expiry and at
exit. It is written independently of ``nopf_web.portmap`` (its own struct
formats), so that a misreading of an RFC in the client is not mirrored here.

Services (each can be turned off; ``--silent`` binds them but never answers):

* UDP 5351 on the LAN address: NAT-PMP (version 0, RFC 6886 §3) and PCP
  (version 2, RFC 6887 MAP and ANNOUNCE); the version byte tells them apart.
  With one of them off, its version gets the other's Unsupported Version
  answer, as a NAT-PMP-only or PCP-only gateway would send. With both off the
  port is closed (ICMP port unreachable).
* UDP 1900: SSDP M-SEARCH answers (multicast 239.255.255.250 joined on the LAN
  address, and unicast), LOCATION ``http://LAN:HTTP_PORT/rootDesc.xml``.
* TCP HTTP_PORT on the LAN address: the device description, the
  WANIPConnection:1 SCPD and its SOAP control (GetExternalIPAddress,
  AddPortMapping, DeletePortMapping).

Mapping table: by default one table for all three protocols, keyed by client
and internal port (as miniupnpd does: a second protocol asking for the same
internal port gets the same entry); ``--separate`` keys it by protocol too, so
the protocols compete for external ports. ``--max-lifetime`` clamps lifetimes
(the lab's renewal tests use a few seconds). ``--external-ip`` lies about the
external address (to test the carrier-grade NAT rule). ``--renew-delay-ms``
holds the answer to a request for an existing entry, ``--answer-delay-ms`` the
answer to one that creates an entry (the mapping itself is made at once).

Events are JSON lines on stdout: ``ready``, ``map`` (``renewal`` true or
false), ``renew-received``, ``delete`` (``why``: request, expiry, exit) and
``stopped``. SIGTERM/SIGINT, or EOF on stdin with ``--watch-stdin``, remove
every rule and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

GATEWAY_PATH = Path(__file__)
PMP_PORT = 5351
SSDP_GROUP, SSDP_PORT = "239.255.255.250", 1900
HTTP_PORT = 49000
TABLE = "nopf_gateway"
LAB_TABLE = "nopf_lab"  # tests/lab/topology.py's ruleset
UUID = "uuid:6e6f7066-6c61-6267-6174-657761790001"
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_DEVICE = "urn:schemas-upnp-org:device:WANDevice:1"
WAN_CONN_DEVICE = "urn:schemas-upnp-org:device:WANConnectionDevice:1"
WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"

# NAT-PMP (RFC 6886 §3.2, §3.3, §3.5), big-endian
PMP_ADDR_RESP = struct.Struct("!BBHI4s")  # vers 0, op 128, result, epoch, address
PMP_MAP_REQ = struct.Struct("!BBHHHI")  # vers 0, op, reserved, internal, suggested, lifetime
PMP_MAP_RESP = struct.Struct("!BBHIHHI")  # vers 0, op 128+x, result, epoch, int, ext, lifetime
PMP_UNSUPP_VERSION = struct.Struct("!BBHI")  # vers 0, op 0, result 1, epoch
# PCP (RFC 6887 §7.1, §7.2, §11.1), big-endian, addresses IPv4-mapped IPv6
PCP_REQ_HDR = struct.Struct("!BBHI16s")  # version 2, R|opcode, reserved, lifetime, client
PCP_RESP_HDR = struct.Struct("!BBBBII12s")  # version 2, R|opcode, reserved, result, ...
PCP_MAP = struct.Struct("!12sB3sHH16s")  # nonce, protocol, reserved, int, ext, address
PCP_ANNOUNCE, PCP_MAP_OP = 0, 1
PCP_SUCCESS, PCP_UNSUPP_VERSION, PCP_NOT_AUTHORIZED, PCP_MALFORMED = 0, 1, 2, 3
PCP_UNSUPP_OPCODE, PCP_UNSUPP_PROTOCOL, PCP_ADDRESS_MISMATCH = 4, 9, 12

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": round(time.monotonic(), 4), **fields}), flush=True)


def v4_in_v6(address: IPv4Address) -> bytes:
    return bytes(10) + b"\xff\xff" + address.packed


@dataclass
class Entry:
    owner: str  # "natpmp", "pcp" or "upnp": who created it
    client: IPv4Address
    internal_port: int
    external_port: int
    expires_at: float  # time.monotonic(); inf for a permanent UPnP lease
    nonce: bytes | None = None
    handles: tuple[int, int | None] = (0, None)


@dataclass
class Gateway:
    lan_ip: IPv4Address
    wan_if: str
    reported_ip: IPv4Address
    natpmp: bool
    pcp: bool
    upnp: bool
    silent: bool
    separate: bool
    max_lifetime: int
    renew_delay: float
    only_permanent: bool
    answer_delay: float = 0.0
    started: float = field(default_factory=time.monotonic)
    entries: dict[int, Entry] = field(default_factory=dict)  # by external port
    rng: random.Random = field(default_factory=random.Random)
    lab_table: bool = False

    @property
    def epoch(self) -> int:
        return int(time.monotonic() - self.started)

    # ------------------------------------------------------------------ nft

    def nft_setup(self) -> None:
        nft(f"add table ip {TABLE}\n"
            f"add chain ip {TABLE} prerouting "
            "{ type nat hook prerouting priority dstnat; policy accept; }\n")
        self.lab_table = subprocess.run(["nft", "list", "table", "ip", LAB_TABLE],
                                        capture_output=True, check=False).returncode == 0

    def nft_open(self, entry: Entry) -> None:
        tag = f'comment "nopf-gateway {entry.external_port}"'
        out = nft(f'add rule ip {TABLE} prerouting iifname "{self.wan_if}" tcp dport '
                  f"{entry.external_port} dnat to {entry.client}:{entry.internal_port} {tag}\n",
                  echo=True)
        dnat = handle_of(out)
        forward = None
        if self.lab_table:  # the lab's forward chain drops new inbound flows otherwise
            out = nft(f'insert rule ip {LAB_TABLE} forward iifname "{self.wan_if}" ip daddr '
                      f"{entry.client} tcp dport {entry.internal_port} ct status dnat accept "
                      f"{tag}\n", echo=True)
            forward = handle_of(out)
        entry.handles = (dnat, forward)

    def nft_close(self, entry: Entry) -> None:
        dnat, forward = entry.handles
        script = f"delete rule ip {TABLE} prerouting handle {dnat}\n"
        if forward is not None:
            script += f"delete rule ip {LAB_TABLE} forward handle {forward}\n"
        nft(script)

    def nft_teardown(self) -> None:
        for entry in list(self.entries.values()):
            self.remove(entry, "exit")
        subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True,
                       check=False)

    # ------------------------------------------------------------------ table

    def find(self, owner: str, client: IPv4Address, internal_port: int) -> Entry | None:
        for entry in self.entries.values():
            if entry.client == client and entry.internal_port == internal_port and (
                    not self.separate or entry.owner == owner):
                return entry
        return None

    def free_port(self, suggested: int) -> int:
        if suggested and suggested not in self.entries:
            return suggested
        while True:
            port = self.rng.randint(20000, 60000)
            if port not in self.entries:
                return port

    def lifetime(self, asked: int) -> int:
        return min(asked, self.max_lifetime) if self.max_lifetime else asked

    def grant(self, owner: str, client: IPv4Address, internal_port: int, suggested: int,
              lifetime: int, nonce: bytes | None = None) -> Entry:
        entry = self.find(owner, client, internal_port)
        renewal = entry is not None
        if entry is None:
            entry = Entry(owner, client, internal_port, self.free_port(suggested), 0.0, nonce)
            self.nft_open(entry)
            self.entries[entry.external_port] = entry
        entry.expires_at = time.monotonic() + lifetime if lifetime else float("inf")
        emit("map", protocol=owner, client=str(client), internal_port=internal_port,
             external_port=entry.external_port, lifetime=lifetime, renewal=renewal,
             created_by=entry.owner)
        return entry

    def remove(self, entry: Entry, why: str, protocol: str | None = None) -> None:
        if self.entries.pop(entry.external_port, None) is None:
            return
        self.nft_close(entry)
        emit("delete", protocol=protocol or entry.owner, client=str(entry.client),
             internal_port=entry.internal_port, external_port=entry.external_port, why=why)

    async def expire(self) -> None:
        while True:
            now = time.monotonic()
            for entry in [e for e in self.entries.values() if e.expires_at <= now]:
                self.remove(entry, "expiry")
            await asyncio.sleep(0.1)

    async def hold_answer(self, owner: str, internal_port: int, renewal: bool) -> None:
        """--renew-delay-ms / --answer-delay-ms: the mapping is made at once, only the
        answer is late (a slow gateway), so a deletion sent meanwhile still wins."""
        if self.renew_delay and renewal:
            emit("renew-received", protocol=owner, internal_port=internal_port)
            await asyncio.sleep(self.renew_delay)
        elif self.answer_delay and not renewal:
            emit("answer-held", protocol=owner, internal_port=internal_port)
            await asyncio.sleep(self.answer_delay)

    # ------------------------------------------------------------------ NAT-PMP / PCP

    async def on_5351(self, data: bytes, client: IPv4Address) -> bytes | None:
        if self.silent or not data:
            return None
        if data[0] == 2 and self.pcp:
            return await self.pcp_request(data, client)
        if data[0] == 0 and self.natpmp:
            return await self.pmp_request(data, client)
        if self.natpmp:  # a NAT-PMP-only gateway (RFC 6886 §3.5)
            return PMP_UNSUPP_VERSION.pack(0, 0, 1, self.epoch)
        # a PCP-only gateway: header-only UNSUPP_VERSION (RFC 6887 §9)
        op = data[1] & 0x7F if len(data) > 1 else 0
        return PCP_RESP_HDR.pack(2, 0x80 | op, 0, PCP_UNSUPP_VERSION, 0, self.epoch, bytes(12))

    async def pmp_request(self, data: bytes, client: IPv4Address) -> bytes | None:
        op = data[1] if len(data) > 1 else 255
        if op >= 128:
            return None  # §3.5: a response, ignored
        if op == 0:
            return PMP_ADDR_RESP.pack(0, 128, 0, self.epoch, self.reported_ip.packed)
        if op not in (1, 2) or len(data) < PMP_MAP_REQ.size:
            return bytes([0, 128 + op]) + struct.pack("!H", 5) + data[4:]  # unsupported opcode
        _, _, _, internal, suggested, lifetime = PMP_MAP_REQ.unpack_from(data)
        if op == 1:  # only TCP is forwarded here
            return PMP_MAP_RESP.pack(0, 128 + op, 2, self.epoch, internal, 0, 0)
        if lifetime == 0:  # §3.4: delete; success even when there is nothing
            entry = self.find("natpmp", client, internal)
            if entry is not None:
                self.remove(entry, "request", "natpmp")
            return PMP_MAP_RESP.pack(0, 128 + op, 0, self.epoch, internal, 0, 0)
        granted = self.lifetime(lifetime)
        renewal = self.find("natpmp", client, internal) is not None
        entry = self.grant("natpmp", client, internal, suggested, granted)
        await self.hold_answer("natpmp", internal, renewal)
        return PMP_MAP_RESP.pack(0, 128 + op, 0, self.epoch, internal, entry.external_port,
                                 granted)

    async def pcp_request(self, data: bytes, client: IPv4Address) -> bytes | None:
        if len(data) < 24 or len(data) > 1100 or len(data) % 4 or data[1] & 0x80:
            return None  # RFC 6887 §8.3: silently dropped
        op = data[1] & 0x7F

        def answer(result: int, lifetime: int = 0, body: bytes = b"") -> bytes:
            return PCP_RESP_HDR.pack(2, 0x80 | op, 0, result, lifetime, self.epoch,
                                     bytes(12)) + body

        _, _, _, lifetime, client_field = PCP_REQ_HDR.unpack_from(data)
        if client_field != v4_in_v6(client):
            return answer(PCP_ADDRESS_MISMATCH, 30)
        if op == PCP_ANNOUNCE:
            return answer(PCP_SUCCESS)
        if op != PCP_MAP_OP:
            return answer(PCP_UNSUPP_OPCODE, 30)
        if len(data) < 60:
            return answer(PCP_MALFORMED, 30)
        nonce, proto, _, internal, suggested, _ = PCP_MAP.unpack_from(data, 24)

        def body(port: int, address: IPv4Address | None) -> bytes:
            packed = v4_in_v6(address) if address else IPv6Address("::ffff:0:0").packed
            return PCP_MAP.pack(nonce, proto, bytes(3), internal, port, packed)

        if proto != 6:
            return answer(PCP_UNSUPP_PROTOCOL, 30, body(0, None))
        entry = self.find("pcp", client, internal)
        if entry is not None and entry.nonce not in (None, nonce):
            return answer(PCP_NOT_AUTHORIZED, 30, body(0, None))  # §11.3: nonce mismatch
        if lifetime == 0:
            if entry is not None:
                self.remove(entry, "request", "pcp")
            return answer(PCP_SUCCESS, 0, body(0, self.reported_ip))
        granted = self.lifetime(lifetime)
        renewal = entry is not None
        entry = self.grant("pcp", client, internal, suggested, granted, nonce)
        await self.hold_answer("pcp", internal, renewal)
        return answer(PCP_SUCCESS, granted, body(entry.external_port, self.reported_ip))

    # ------------------------------------------------------------------ UPnP

    def ssdp_answer(self, data: bytes) -> list[bytes]:
        text = data.decode(errors="replace")
        if self.silent or not text.startswith("M-SEARCH"):
            return []
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in text.split("\r\n")[1:]) if k}
        st = headers.get("st", "")
        known = {IGD, WAN_DEVICE, WAN_CONN_DEVICE, WANIP, "upnp:rootdevice", UUID}
        targets = [IGD, "upnp:rootdevice", WANIP] if st == "ssdp:all" else \
            [st] if st in known else []
        return [(
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\n"
            f"LOCATION: http://{self.lan_ip}:{HTTP_PORT}/rootDesc.xml\r\n"
            "SERVER: Linux UPnP/1.1 nopf-lab-gateway/1\r\n"
            f"ST: {target}\r\nUSN: {UUID}::{target}\r\n\r\n").encode() for target in targets]

    def description(self) -> str:
        def device(kind: str, name: str, inner: str) -> str:
            return (f"<device><deviceType>{kind}</deviceType><friendlyName>{name}</friendlyName>"
                    "<manufacturer>nopf lab</manufacturer><modelName>lab gateway</modelName>"
                    f"<UDN>{UUID}{name[-1]}</UDN>{inner}</device>")

        service = (f"<serviceList><service><serviceType>{WANIP}</serviceType>"
                   "<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>"
                   "<SCPDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL>"
                   "<eventSubURL>/evt/IPConn</eventSubURL></service></serviceList>")
        conn = device(WAN_CONN_DEVICE, "conn2", service)
        wan = device(WAN_DEVICE, "wan1", f"<deviceList>{conn}</deviceList>")
        root = device(IGD, "igd0", f"<deviceList>{wan}</deviceList>")
        return ('<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">'
                f"<specVersion><major>1</major><minor>1</minor></specVersion>{root}</root>")

    @staticmethod
    def scpd() -> str:
        def arg(name: str, direction: str, var: str) -> str:
            return (f"<argument><name>{name}</name><direction>{direction}</direction>"
                    f"<relatedStateVariable>{var}</relatedStateVariable></argument>")

        def action(name: str, *args: str) -> str:
            return (f"<action><name>{name}</name>"
                    f"<argumentList>{''.join(args)}</argumentList></action>")

        def var(name: str, kind: str, extra: str = "") -> str:
            return (f'<stateVariable sendEvents="no"><name>{name}</name>'
                    f"<dataType>{kind}</dataType>{extra}</stateVariable>")

        common = [arg("NewRemoteHost", "in", "RemoteHost"),
                  arg("NewExternalPort", "in", "ExternalPort"),
                  arg("NewProtocol", "in", "PortMappingProtocol")]
        actions = [
            action("GetExternalIPAddress", arg("NewExternalIPAddress", "out",
                                               "ExternalIPAddress")),
            action("AddPortMapping", *common, arg("NewInternalPort", "in", "InternalPort"),
                   arg("NewInternalClient", "in", "InternalClient"),
                   arg("NewEnabled", "in", "PortMappingEnabled"),
                   arg("NewPortMappingDescription", "in", "PortMappingDescription"),
                   arg("NewLeaseDuration", "in", "PortMappingLeaseDuration")),
            action("DeletePortMapping", *common),
        ]
        variables = [
            var("ExternalIPAddress", "string"), var("RemoteHost", "string"),
            var("ExternalPort", "ui2"), var("InternalPort", "ui2"),
            var("PortMappingProtocol", "string", "<allowedValueList><allowedValue>TCP"
                "</allowedValue><allowedValue>UDP</allowedValue></allowedValueList>"),
            var("InternalClient", "string"), var("PortMappingEnabled", "boolean"),
            var("PortMappingDescription", "string"), var("PortMappingLeaseDuration", "ui4"),
        ]
        return ('<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
                "<specVersion><major>1</major><minor>0</minor></specVersion>"
                f"<actionList>{''.join(actions)}</actionList>"
                f"<serviceStateTable>{''.join(variables)}</serviceStateTable></scpd>")

    async def soap(self, action: str, args: dict[str, str], client: IPv4Address) \
            -> tuple[int, str]:
        def ok(**out: str) -> tuple[int, str]:
            inner = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
            return 200, (f'<u:{action}Response xmlns:u="{WANIP}">{inner}</u:{action}Response>')

        def fault(code: int, text: str) -> tuple[int, str]:
            return 500, ("<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError"
                         "</faultstring><detail><UPnPError xmlns=\"urn:schemas-upnp-org:"
                         f"control-1-0\"><errorCode>{code}</errorCode><errorDescription>"
                         f"{text}</errorDescription></UPnPError></detail></s:Fault>")

        if action == "GetExternalIPAddress":
            return ok(NewExternalIPAddress=str(self.reported_ip))
        try:
            port = int(args.get("NewExternalPort", ""))
        except ValueError:
            return fault(402, "Invalid Args")
        if args.get("NewProtocol") != "TCP" or args.get("NewRemoteHost", ""):
            return fault(402, "Invalid Args")
        if action == "DeletePortMapping":
            entry = self.entries.get(port)
            if entry is None or entry.client != client:
                return fault(714, "NoSuchEntryInArray")
            self.remove(entry, "request", "upnp")
            return ok()
        if action != "AddPortMapping":
            return fault(401, "Invalid Action")
        try:
            internal = int(args["NewInternalPort"])
            lease = int(args.get("NewLeaseDuration", "0"))
            target = IPv4Address(args["NewInternalClient"])
        except (KeyError, ValueError):
            return fault(402, "Invalid Args")
        if port == 0:
            return fault(716, "WildCardNotPermittedInExtPort")
        if target != client:
            return fault(606, "Action not authorized")  # only for oneself, like miniupnpd
        if self.only_permanent and lease:
            return fault(725, "OnlyPermanentLeasesSupported")
        existing = self.entries.get(port)
        if existing is not None and (existing.client, existing.internal_port) != (
                client, internal):
            return fault(718, "ConflictInMappingEntry")
        mine = self.find("upnp", client, internal)
        if mine is not None and mine.external_port != port:
            self.remove(mine, "request", "upnp")  # moved to another external port
        renewal = self.find("upnp", client, internal) is not None
        # not clamped: IGD v1 has no way to tell the client of a shorter lease
        self.grant("upnp", client, internal, port, lease)
        await self.hold_answer("upnp", internal, renewal)
        return ok()

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode(errors="replace").split("\r\n")
                method, path, _ = [*lines[0].split(" "), "", "", ""][:3]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:]) if k}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, ctype, payload = await self.route(method, path, headers, body,
                                                      IPv4Address(writer.get_extra_info(
                                                          "peername")[0]))
            data = payload.encode()
            writer.write((f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                          f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                          "Connection: close\r\n\r\n").encode() + data)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # Our shutdown (a held --renew-delay-ms answer): this task is the root of
            # its own connection, awaited by nobody; Python 3.11's stream callback logs
            # a traceback for a cancelled handler, so end it normally.
            return
        finally:
            writer.close()

    async def route(self, method: str, path: str, headers: dict[str, str], body: bytes,
                    client: IPv4Address) -> tuple[int, str, str]:
        xml = 'text/xml; charset="utf-8"'
        if method == "GET" and path == "/rootDesc.xml":
            return 200, xml, self.description()
        if method == "GET" and path == "/WANIPCn.xml":
            return 200, xml, self.scpd()
        if method == "POST" and path == "/ctl/IPConn":
            action = headers.get("soapaction", "").strip('"').rpartition("#")[2]
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                return 400, xml, ""
            call = root.find(f"{{{SOAP_ENV}}}Body")
            args = {child.tag.rpartition("}")[2]: (child.text or "")
                    for element in (call if call is not None else []) for child in element}
            status, inner = await self.soap(action, args, client)
            return status, xml, (f'<?xml version="1.0"?><s:Envelope xmlns:s="{SOAP_ENV}" '
                                 's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
                                 f"<s:Body>{inner}</s:Body></s:Envelope>")
        return 404, "text/plain", "not found"


def nft(script: str, *, echo: bool = False) -> str:
    argv = ["nft", *(["--echo", "--handle"] if echo else []), "-f", "-"]
    proc = subprocess.run(argv, input=script.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def handle_of(echo: str) -> int:
    return int(echo.rsplit("# handle", 1)[1].split()[0])


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.handle(self, data, addr)


async def serve(gw: Gateway, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.watch_stdin:  # our owner holds the other end: EOF means it died
        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                stop.set()
        loop.add_reader(sys.stdin.fileno(), on_stdin)
    gw.nft_setup()
    transports: list[asyncio.BaseTransport] = []
    replies: set[asyncio.Task[None]] = set()
    try:
        async with asyncio.TaskGroup() as tg:
            if gw.natpmp or gw.pcp or gw.silent:
                def on_pmp(proto: _Udp, data: bytes, addr: tuple[str, int]) -> None:
                    async def reply() -> None:
                        out = await gw.on_5351(data, IPv4Address(addr[0]))
                        if out is not None and proto.transport is not None:
                            proto.transport.sendto(out, addr)
                    task = tg.create_task(reply(), name="gateway-5351-reply")
                    replies.add(task)
                    task.add_done_callback(replies.discard)
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(on_pmp), local_addr=(str(gw.lan_ip), PMP_PORT))
                transports.append(transport)
            if gw.upnp or gw.silent:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", SSDP_PORT))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                socket.inet_aton(SSDP_GROUP) + gw.lan_ip.packed)

                def on_ssdp(proto: _Udp, data: bytes, addr: tuple[str, int]) -> None:
                    for answer in gw.ssdp_answer(data):
                        if proto.transport is not None:
                            proto.transport.sendto(answer, addr)
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(on_ssdp),
                                                                   sock=sock)
                transports.append(transport)
                server = await asyncio.start_server(gw.http, str(gw.lan_ip), HTTP_PORT)
                transports.append(server)  # type: ignore[arg-type]
            expiry = tg.create_task(gw.expire(), name="gateway-expiry")
            emit("ready", natpmp=gw.natpmp, pcp=gw.pcp, upnp=gw.upnp, silent=gw.silent,
                 external_ip=str(gw.reported_ip))
            await stop.wait()
            expiry.cancel()
            for t in transports:
                t.close()
            for task in list(replies):  # held by --renew-delay-ms
                task.cancel()
    finally:
        gw.nft_teardown()
        emit("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lan-ip", type=IPv4Address, required=True)
    parser.add_argument("--wan-ip", type=IPv4Address, required=True)
    parser.add_argument("--wan-if", default="wan")
    parser.add_argument("--external-ip", type=IPv4Address,
                        help="report this external address instead of --wan-ip (a lie)")
    for name in ("natpmp", "pcp", "upnp"):
        parser.add_argument(f"--no-{name}", action="store_true")
    parser.add_argument("--silent", action="store_true", help="bind every service, answer none")
    parser.add_argument("--separate", action="store_true", help="a mapping table per protocol")
    parser.add_argument("--max-lifetime", type=int, default=0, help="clamp lifetimes (s)")
    parser.add_argument("--renew-delay-ms", type=float, default=0.0,
                        help="answer renewals this late")
    parser.add_argument("--answer-delay-ms", type=float, default=0.0,
                        help="answer new mappings this late")
    parser.add_argument("--only-permanent", action="store_true",
                        help="UPnP: refuse leases other than 0 (error 725)")
    parser.add_argument("--watch-stdin", action="store_true", help="exit at EOF on stdin")
    args = parser.parse_args(argv)
    gw = Gateway(args.lan_ip, args.wan_if, args.external_ip or args.wan_ip,
                 not args.no_natpmp, not args.no_pcp, not args.no_upnp, args.silent,
                 args.separate, args.max_lifetime, args.renew_delay_ms / 1000,
                 args.only_permanent, args.answer_delay_ms / 1000)
    asyncio.run(serve(gw, args))
    return 0


# --------------------------------------------------------------------------- test side


class GatewayProcess:
    """The gateway running in a lab NAT namespace, seen from the test process."""

    def __init__(self, proc: subprocess.Popen[bytes], nat: Any) -> None:
        self.proc = proc
        self.nat = nat
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="gateway-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)
            self._queue.put(event)
        self._queue.put(None)

    def seen(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The first event of that kind (already seen or coming) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.seen(event, **match)
            if found:
                return found[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gateway: no {event} {match} within {timeout} s; "
                                   f"saw {[e['event'] for e in self.events]}")
            try:
                if self._queue.get(timeout=min(left, 0.1)) is None and not self.seen(
                        event, **match):
                    raise TimeoutError(f"gateway exited before {event} {match}")
            except queue.Empty:
                pass

    def rules(self) -> str:
        """The NAT namespace's nft rules that this gateway added (by comment)."""
        out = self.nat.run(["nft", "list", "ruleset"]).stdout.decode()
        return "\n".join(line.strip() for line in out.splitlines() if "nopf-gateway" in line)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout)
        self._reader.join(timeout)


def start(nat: Any, *, off: Iterable[str] = (), external_ip: str | None = None,
          extra: list[str] | None = None, timeout: float = 10.0) -> GatewayProcess:
    """Start the gateway in ``nat`` (a lab ``Nat``) and wait for it to be ready.

    ``off`` names services to turn off: "natpmp", "pcp", "upnp".

    The lab stops it at teardown like any ``Host.popen`` process (SIGTERM, so
    its rules go too); ``GatewayProcess.stop()`` stops it sooner.
    """
    argv = [sys.executable, "-I", str(GATEWAY_PATH), "--lan-ip", nat.lan_ip,
            "--wan-ip", nat.wan_ip, "--watch-stdin"]
    argv += [f"--no-{name}" for name in off]
    if external_ip:
        argv += ["--external-ip", external_ip]
    argv += extra or []
    proc = nat.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    gateway = GatewayProcess(proc, nat)
    gateway.wait_for("ready", timeout)
    return gateway


if __name__ == "__main__":
    sys.exit(main())
