"""A minimal reader of tcpdump's classic pcap files: TCP payload streams, reassembled.

Enough to check what crossed a host's interface: Ethernet (or Linux cooked)
frames, IPv4, TCP; each direction of each connection reassembled by sequence
number from its SYN (retransmissions and overlaps written once, gaps reported).

pcap file: a 24-byte global header (magic 0xa1b2c3d4 in the writer's byte order,
or 0xa1b23c4d for nanosecond timestamps; version 2.4; thiszone, sigfigs, snaplen,
linktype u32), then records of a 16-byte header (ts_sec, ts_frac, incl_len,
orig_len, u32 each) and incl_len bytes of the frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
ETH_P_IP = 0x0800
IPPROTO_TCP = 6
TCP_SYN = 0x02

Flow = tuple[str, int, str, int]  # (source ip, port, destination ip, port)


@dataclass
class Stream:
    """One direction of one TCP connection."""

    isn: int | None = None  # the SYN's sequence number
    segments: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, payload)

    def data(self) -> bytes:
        """The payload from the SYN on, in order; a gap raises (the capture lost it)."""
        isn = self.isn
        if isn is None:
            raise ValueError("no SYN captured for this stream")
        out = bytearray()
        for seq, payload in sorted(self.segments, key=lambda s: (s[0] - isn - 1) % 2**32):
            offset = (seq - isn - 1) % 2**32
            if offset > len(out):
                raise ValueError(f"gap in the capture at byte {len(out)} (next at {offset})")
            out += payload[len(out) - offset:]  # retransmitted or overlapping bytes once
        return bytes(out)


def _ip(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def read_streams(path: Path) -> dict[Flow, list[Stream]]:
    """Every TCP stream direction in the capture, by its flow: one per connection, in
    order (a 4-tuple used again after its close starts a new one at its SYN)."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise ValueError(f"{path} is not a classic pcap file")
    (linktype,) = struct.unpack_from(order + "I", data, 20)
    streams: dict[Flow, list[Stream]] = {}
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, orig = struct.unpack_from(order + "IIII", data, pos)
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if incl < orig:
            raise ValueError("a frame was cut by the snap length: capture with -s 0")
        if linktype == LINKTYPE_ETHERNET:
            ethertype, ip = struct.unpack_from("!H", frame, 12)[0], frame[14:]
        elif linktype == LINKTYPE_LINUX_SLL:
            ethertype, ip = struct.unpack_from("!H", frame, 14)[0], frame[16:]
        else:
            raise ValueError(f"link type {linktype} is not supported")
        if ethertype != ETH_P_IP or len(ip) < 20 or ip[9] != IPPROTO_TCP:
            continue
        ihl = (ip[0] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", ip, 2)
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from("!HHI", tcp)
        offset = (tcp[12] >> 4) * 4
        flags = tcp[13]
        flow = (_ip(ip[12:16]), sport, _ip(ip[16:20]), dport)
        of_flow = streams.setdefault(flow, [Stream()])
        if flags & TCP_SYN and of_flow[-1].isn not in (None, seq):  # a new connection
            of_flow.append(Stream())
        stream = of_flow[-1]
        if flags & TCP_SYN:
            stream.isn = seq
            seq += 1  # data in a SYN (TCP Fast Open) starts after it
        payload = tcp[offset:]
        if payload:
            stream.segments.append((seq, payload))
    return streams
