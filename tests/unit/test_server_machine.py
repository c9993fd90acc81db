"""The rendezvous server's machine, on bytes and a fake clock: no sockets, no loop."""

from __future__ import annotations

import ast
import itertools
import pathlib

import pytest
from hypothesis import event, given, settings, strategies as st

import nopf_web
from nopf_web.rendezvous.book import (
    ClaimRefused,
    NameplateBook,
    PairingLimits,
)
from nopf_web.rendezvous.server_machine import (
    DEFAULT_RTT,
    FIRE_MARGIN,
    MAX_RETRIES,
    PING_ONCE_WAIT,
    QUICK_PINGS,
    RETRY_WAIT,
    Accepted,
    Close,
    ConnId,
    Log,
    Lost,
    Reset,
    Send,
    ServerLimits,
    Shutdown,
)
from nopf_web.tunnel.secure import Pake
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY_SIZE, decode_reply, encode_reply6
from nopf_web.wire.rendezvous import (
    Fire,
    FrameReader,
    Hello,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    Welcome,
    decode_server_message,
    encode,
)

from .server_harness import (
    JOINER_IP,
    LAN_A,
    LAN_B,
    SHARER_IP,
    Harness,
    Peer,
    error_of,
    fires,
)

# The house rule -------------------------------------------------------------------------


def test_machines_import_no_io_or_clock() -> None:
    banned = {"asyncio", "socket", "selectors", "threading", "time"}
    root = pathlib.Path(nopf_web.__file__).parent
    machines = sorted(root.rglob("*machine*.py"))
    assert root / "rendezvous" / "server_machine.py" in machines
    for path in machines:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


# Seed clients ---------------------------------------------------------------------------


def test_the_reply_is_the_seeds_ten_bytes_before_anything_is_read() -> None:
    h = Harness()
    a = h.connect("198.51.100.7", 4000)
    assert a.data == bytes([198, 51, 100, 7]) + (4000).to_bytes(2, "big") + b"END\x00"
    b = h.connect("::ffff:192.0.2.1", 65535)  # a dual-stack listener's IPv4-mapped address
    assert b.data == bytes([192, 0, 2, 1, 0xFF, 0xFF]) + b"END\x00"
    assert h.m.stats.served == 2 and h.m.stats.open_now == 2


def test_a_seed_client_that_closes_is_reset_and_forgotten() -> None:
    h = Harness()
    a = h.connect()
    assert h.close(a) == [Reset(a.id)]
    assert h.m.stats.open_now == 0 and h.m.next_deadline is None


def test_a_seed_client_that_stays_open_is_closed_after_the_hello_timeout() -> None:
    h = Harness(ServerLimits(hello_timeout=1.0, write_timeout=5.0))
    a = h.connect()
    assert h.m.next_deadline == h.now + 1.0
    assert h.advance(0.999) == []
    assert h.advance(0.001) == [Close(a.id)]
    assert h.m.stats.open_now == 1  # until the close completes
    h.feed(Lost(a.id, h.now))
    assert h.m.stats.open_now == 0
    # A close that never completes (the client never reads) is reset after write_timeout.
    b = h.connect()
    h.advance(1.0)
    assert b.ended == "close"
    assert h.advance(4.99) == [] and h.advance(0.01) == [Reset(b.id)]
    assert h.m.stats.open_now == 0


def test_noise_is_reset_and_a_partial_frame_is_reset_at_the_timeout() -> None:
    h = Harness()
    a = h.connect()
    assert h.send(a, b"GET / HTTP/1.1\r\n\r\n") == [Reset(a.id)]  # length 0x47455420: too big
    b = h.connect()
    assert h.send(b, b"\x00\x00\x00\x10{") == []
    assert h.advance(1.0) == [Reset(b.id)]
    assert h.m.stats.open_now == 0 and not h.logs  # no log line for seed-era noise


def test_a_probe_is_closed_at_once() -> None:
    h = Harness()
    a = h.connect()
    assert h.send(a, encode(Probe())) == [Close(a.id)]
    assert a.data == a.reply  # nothing but the reply


def test_the_failed_write_of_a_reply_is_counted_and_logged() -> None:
    h = Harness()
    a = h.connect()
    assert h.lost(a, writing=True) == [Log("error", f"could not serve {JOINER_IP}:"
                                            f"{40000 + a.id}: [Errno 104] Connection reset "
                                            "by peer")]
    assert (h.m.stats.served, h.m.stats.failed, h.m.stats.open_now) == (0, 1, 0)


def test_a_peer_without_address_is_not_served_and_an_ipv6_one_gets_its_ipv6_reply() -> None:
    h = Harness()
    h.peers[7] = Peer(7)
    assert h.feed(Accepted(7, None, h.now)) == [
        Log("error", "could not serve ?: connection closed before it could be served"),
        Reset(7)]
    assert h.m.stats.failed == 1 and h.m.stats.served == 0
    # IPv6 (a dual-stack rendezvous): the 22-byte IPv6 reply, then the hello wait of
    # every connection (coordinated mode over IPv6); a client that sends none is closed.
    h.peers[8] = Peer(8, ipv6=True)
    actions = h.feed(Accepted(8, ("2001:db8::1", 5000), h.now))
    assert actions == [Send(8, encode_reply6("2001:db8::1", 5000))]
    assert h.m.stats.failed == 1 and h.m.stats.served == 1
    assert h.advance(1.0) == [Close(8)]


# Caps -------------------------------------------------------------------------------------


def test_the_per_source_cap_refuses_with_one_log_line_and_spares_other_sources() -> None:
    h = Harness(ServerLimits(max_per_source=4, log_interval=10))
    peers = [h.connect("192.0.2.9") for _ in range(10)]
    assert [p.ended for p in peers] == [None] * 4 + ["reset"] * 6
    assert all(p.data == b"" for p in peers[4:])  # refused before the reply
    assert [x.line for x in h.logs] == ["refused 192.0.2.9: over 4 open connections from "
                                        "one address"]
    assert h.m.stats.refused_flood == 6 and h.m.stats.open_now == 4
    other = h.connect("192.0.2.10")
    assert other.ended is None and len(other.data) == REPLY_SIZE
    h.advance(11)  # the interval is over: the next refusal is logged with its repeats
    for p in peers[:4]:
        h.feed(Lost(p.id, h.now))
    more = [h.connect("192.0.2.9") for _ in range(5)]
    assert [p.ended for p in more] == [None] * 4 + ["reset"]
    assert h.logs[-1].line.endswith("(and 5 more like it)")


def test_the_global_cap_refuses() -> None:
    h = Harness(ServerLimits(max_connections=3))
    peers = [h.connect(f"192.0.2.{i}") for i in range(1, 6)]
    assert [p.ended for p in peers] == [None, None, None, "reset", "reset"]
    assert h.m.stats.refused_capacity == 2
    assert h.logs[0].line == "refused 192.0.2.4: 3 connections open"
    h.close(peers[0])
    assert h.connect("192.0.2.9").ended is None


# The hello ---------------------------------------------------------------------------------


SHARE = Hello("share", None, (LAN_A,), None, 10)


@settings(max_examples=50)
@given(st.lists(st.integers(0, len(encode(SHARE))), max_size=6))
def test_a_hello_split_anywhere_across_reads_is_one_hello(cuts: list[int]) -> None:
    h = Harness()
    peer = h.connect(SHARER_IP)
    data = encode(SHARE)
    points = [0, *sorted(cuts), len(data)]
    for lo, hi in itertools.pairwise(points):
        h.send(peer, data[lo:hi])
    msgs = peer.messages()
    assert [type(m) for m in msgs] == [Welcome, Ping]
    assert isinstance(msgs[0], Welcome) and msgs[0].public == Endpoint(SHARER_IP, 40001)
    assert h.m.stats.coordinated == 1


@pytest.mark.parametrize(("data", "code", "logged"), [
    (encode(Pong(1)), "bad_request", "the first message must be a single hello"),
    (encode(SHARE) + encode(Pong(1)), "bad_request", "the first message must be a single hello"),
    (encode(SHARE) + b"\x00", "bad_request", "the first message must be a single hello"),
    (b"\x00\x00\x00\x02{}", "bad_request", "unexpected message type None"),
    (b"\x00\x00\x00\x04\xff\xfe{}", "bad_request", "not UTF-8"),
    (encode(SHARE).replace(b'"version":2', b'"version":3'), "unsupported_version", None),
    (encode(Probe()).replace(b'"version":2', b'"version":9'), "unsupported_version", None),
])
def test_a_frame_that_is_no_valid_hello_is_refused(data: bytes, code: str,
                                                   logged: str | None) -> None:
    h = Harness()
    peer = h.connect()
    h.send(peer, data)
    err = error_of(peer)
    assert err.code == code and peer.fin and peer.ended is None
    if logged is None:
        assert not h.logs and "not supported" in err.message
    else:
        assert len(h.logs) == 1 and h.logs[0].kind == "bad-hello"
        line = h.logs[0].line
        assert line.startswith(f"bad hello from {JOINER_IP}:") and logged in line
        assert err.message.startswith("rendezvous rejected the hello:") and logged in err.message
    # The last word: bytes after it are discarded; the peer's FIN gets our close.
    assert h.send(peer, encode(Pong(3))) == []
    assert h.close(peer) == [Close(peer.id)]
    assert h.m.stats.coordinated == 0


def test_a_last_word_is_reset_if_the_peer_never_closes() -> None:
    h = Harness(ServerLimits(write_timeout=2.0))
    peer = h.connect()
    h.send(peer, encode(Pong(1)))
    assert h.advance(1.99) == [] and h.advance(0.01) == [Reset(peer.id)]
    assert h.m.stats.open_now == 0


# Sharing, pings and liveness ------------------------------------------------------------------


def test_a_sharer_gets_its_nameplate_three_quick_pings_then_one_per_interval() -> None:
    h = Harness(ServerLimits(ping_interval=15.0))
    t0 = h.now
    sharer, nameplate = h.share(rtt=0.02)
    assert h.m.book.is_open(nameplate)
    welcome = sharer.messages()[0]
    assert welcome == Welcome(nameplate, 600.0, Endpoint(SHARER_IP, 40001))
    seqs: list[tuple[float, int]] = []

    def answer() -> None:
        for when, data in sharer.sent_at:
            for p in FrameReader().feed(data[REPLY_SIZE:] if data.startswith(sharer.reply)
                                        else data):
                msg = decode_server_message(p)
                if isinstance(msg, Ping) and (when, msg.seq) not in seqs:
                    seqs.append((when, msg.seq))

    answer()
    assert seqs == [(t0, 1)]
    for _ in range(QUICK_PINGS + 1):
        h.advance(0.04)  # 2 x the kernel's RTT
        answer()
    # Without pongs the RTT stays the kernel's (20 ms): quick pings every 40 ms.
    assert [s for _, s in seqs] == [1, 2, 3]
    assert [round(t - t0, 3) for t, _ in seqs] == [0.0, 0.04, 0.08]
    h.send(sharer, encode(Pong(3)) + encode(Pong(99)), rtt=0.02)  # an unknown seq: ignored
    h.advance(15.0)
    answer()
    assert [s for _, s in seqs] == [1, 2, 3, 4]
    assert round(seqs[-1][0] - seqs[-2][0], 3) == 15.0
    assert h.m.conns[sharer.id].rtts == [pytest.approx(0.16 - 0.08)]  # ping 3's round trip


def test_a_sharer_that_stops_answering_is_dropped_and_its_code_closed() -> None:
    h = Harness(ServerLimits(ping_interval=15.0))
    sharer, nameplate = h.share()
    h.advance(3 * 15 + 1)
    assert sharer.ended is None  # 46 s without a pong: not yet over the limit
    h.advance(15)
    assert sharer.ended == "reset" and h.m.stats.open_now == 0
    joiner = h.join(nameplate)
    assert error_of(joiner).code == "unknown_code" and "stopped waiting" in error_of(joiner).message


def test_a_sharer_answering_pings_stays() -> None:
    h = Harness(ServerLimits(ping_interval=15.0, pairing=PairingLimits(code_lifetime=3000)))
    sharer, _ = h.share()
    for _ in range(200):
        h.advance(1.0)
        h.pong(sharer)
    assert sharer.ended is None and h.m.conns[sharer.id].sharing is not None


def test_a_sharer_that_leaves_or_breaks_closes_its_code() -> None:
    for leave in ("close", "lost", "hello", "garbage"):
        h = Harness()
        sharer, nameplate = h.share()
        if leave == "close":
            assert h.close(sharer) == [Reset(sharer.id)]
        elif leave == "lost":
            assert h.lost(sharer) == []
        elif leave == "hello":
            assert h.send(sharer, encode(SHARE)) == [Reset(sharer.id)]
        else:
            assert h.send(sharer, b"\xff\xff\xff\xff") == [Reset(sharer.id)]
        assert not h.m.book.is_open(nameplate) and h.m.stats.open_now == 0, leave
        joiner = h.join(nameplate)
        assert "stopped waiting" in error_of(joiner).message, leave


def test_a_sharer_sends_one_pake_message_only() -> None:
    h = Harness()
    pake = Pake("server", "5-orbit-lantern").message
    sharer, nameplate = h.share(pake=pake)
    assert h.m.conns[sharer.id].pake == pake and sharer.ended is None
    assert h.send(sharer, encode(PakeMessage(pake))) == [Reset(sharer.id)]
    assert not h.m.book.is_open(nameplate)


def test_an_unclaimed_code_expires_and_both_sides_are_told() -> None:
    h = Harness(ServerLimits(pairing=PairingLimits(code_lifetime=30)))
    sharer, nameplate = h.share()
    for _ in range(30):
        h.advance(1)
        h.pong(sharer)
        if sharer.fin:
            break
    err = error_of(sharer)
    assert err.code == "expired" and err.message == "nobody used the pairing code within 30 s"
    assert sharer.sent_at[-1][0] == pytest.approx(100.0 + 30)
    joiner = h.join(nameplate)
    assert error_of(joiner).code == "expired"


def test_a_full_book_answers_busy() -> None:
    h = Harness(ServerLimits(pairing=PairingLimits(max_open_codes=1)))
    h.share()
    peer = h.hello(SHARE, "192.0.2.50")
    assert error_of(peer).code == "busy"


# Joining, plans and fire times --------------------------------------------------------------


def test_pairing_sends_each_its_fire_the_joiner_first_the_sharer_timed() -> None:
    h = Harness()
    pa, pb = Pake("server", "3-orbit-lantern").message, Pake("client", "3-orbit-lantern").message
    sharer, nameplate = h.share(rtt=0.02, pake=pa)
    h.advance(1.0)
    joined_at = h.now
    joiner = h.join(nameplate, rtt=0.06, pake=pb)
    # The joiner's fire leaves at once, with its FIN.
    assert isinstance(joiner.last(), Fire) and joiner.fin
    assert joiner.sent_at[-1][0] == joined_at
    # The sharer's: (RTT_B - RTT_A) / 2 + FIRE_MARGIN later, not a moment before.
    due = joined_at + (0.06 - 0.02) / 2 + FIRE_MARGIN
    assert h.m.next_deadline == pytest.approx(due)
    assert not isinstance(sharer.last(), Fire)
    h.advance(due - h.now - 1e-6)
    assert not isinstance(sharer.last(), Fire)
    h.advance(1e-6)
    s, j = fires(sharer, joiner)
    assert sharer.sent_at[-1][0] == pytest.approx(due) and sharer.fin
    assert s.public == j.peer_public == Endpoint(SHARER_IP, sharer.id + 40000)
    assert j.public == s.peer_public == Endpoint(JOINER_IP, joiner.id + 40000)
    assert [(st.path, st.punch) for st in s.plan] == [("public", "arm")]
    assert [(st.path, st.punch) for st in j.plan] == [("public", "connect")]
    assert s.rtt_ms == j.rtt_ms == 40.0
    assert (s.peer_pake, j.peer_pake) == (pb, pa)
    assert s.mapping == ("unknown", "unknown") and j.mapping == ("unknown", "unknown")
    assert h.m.stats.paired == 1 and not h.m.book.is_open(nameplate)
    # Both then close; the machine forgets them when the closes complete.
    for p in (sharer, joiner):
        assert h.close(p) == [Close(p.id)]
        h.feed(Lost(p.id, h.now))
    assert h.m.stats.open_now == 0 and h.m.next_deadline is None
    assert h.m.retries[nameplate].left == MAX_RETRIES


def test_a_joiner_with_a_shorter_rtt_still_gets_its_fire_first() -> None:
    h = Harness()
    sharer, nameplate = h.share(rtt=0.08)
    joiner = h.join(nameplate, rtt=0.01)
    assert isinstance(joiner.last(), Fire)
    assert h.m.next_deadline == pytest.approx(h.now + FIRE_MARGIN)  # max(0, ...) + margin
    h.advance(FIRE_MARGIN)
    s, _ = fires(sharer, joiner)
    assert s.rtt_ms == 45.0


def test_a_hello_in_the_syn_fires_both_without_measuring() -> None:
    h = Harness()
    sharer, nameplate = h.share(rtt=0.03)
    joiner = h.join(nameplate, rtt=None, syn_data=True)
    assert isinstance(joiner.last(), Fire) and h.m.stats.syn_data == 1
    assert not any(isinstance(m, Ping) for m in joiner.messages())
    assert h.m.next_deadline == pytest.approx(h.now + FIRE_MARGIN)
    h.advance(FIRE_MARGIN)
    s, j = fires(sharer, joiner)
    assert s.rtt_ms == j.rtt_ms == 30.0


def test_a_joiner_without_kernel_rtt_is_pinged_once() -> None:
    h = Harness()
    sharer, nameplate = h.share(rtt=0.02)
    joiner = h.join(nameplate, rtt=None)
    assert joiner.messages() == [Ping(1)] and not joiner.fin
    h.advance(0.1)
    h.send(joiner, encode(Pong(1)))
    assert isinstance(joiner.last(), Fire)
    assert h.m.next_deadline == pytest.approx(h.now + (0.1 - 0.02) / 2 + FIRE_MARGIN)
    h.advance(1)
    s, _ = fires(sharer, joiner)
    assert s.rtt_ms == 60.0


def test_without_any_rtt_the_default_is_assumed() -> None:
    h = Harness()
    sharer = h.hello(SHARE, SHARER_IP, rtt=None)
    welcome = sharer.messages()[0]
    assert isinstance(welcome, Welcome)
    # No kernel RTT and no pong: quick pings 2 x DEFAULT_RTT apart.
    assert h.m.next_deadline == pytest.approx(h.now + 2 * DEFAULT_RTT)
    joiner = h.join(welcome.nameplate, rtt=None, syn_data=True)
    h.advance(FIRE_MARGIN)
    s, _ = fires(sharer, joiner)
    assert s.rtt_ms == DEFAULT_RTT * 1000


@pytest.mark.parametrize("how", ["silent", "close", "garbage", "noise", "lost"])
def test_a_joiners_ping_ends_without_a_sample_and_the_pairing_goes_ahead(how: str) -> None:
    h = Harness()
    sharer, nameplate = h.share(rtt=0.02)
    joiner = h.join(nameplate, rtt=None)
    if how == "silent":
        h.advance(PING_ONCE_WAIT - 0.01)
        assert joiner.messages() == [Ping(1)]
        h.advance(0.01)
    elif how == "close":
        h.close(joiner)
    elif how == "garbage":  # a joiner has no pake message to send
        h.send(joiner, encode(PakeMessage(Pake("client", "1-a-b").message)))
    elif how == "noise":
        h.send(joiner, b"\x00\x00\x00\x01]")
    else:
        h.lost(joiner)
    h.advance(1)
    s = sharer.last()
    assert isinstance(s, Fire) and s.rtt_ms == 20.0  # the joiner's RTT unknown: the sharer's
    if how == "lost":
        assert joiner.messages() == [Ping(1)]  # nothing more for a lost connection
    else:
        assert isinstance(joiner.last(), Fire)
    if how == "close":
        assert joiner.ended == "close"  # its FIN was in: ours, then close
    assert h.m.stats.paired == 1


def test_a_sharer_gone_while_the_joiner_measured_is_named() -> None:
    h = Harness()
    sharer, nameplate = h.share()
    joiner = h.join(nameplate, rtt=None)
    h.close(sharer)
    h.send(joiner, encode(Pong(1)))
    err = error_of(joiner)
    assert err.code == "unknown_code" and "stopped waiting" in err.message
    assert h.m.stats.paired == 0


def test_claims_are_single_use_and_guesses_are_limited() -> None:
    h = Harness(ServerLimits(pairing=PairingLimits(max_failed_claims=3)))
    sharer, nameplate = h.share()
    wrong = [n for n in range(1, 10) if n != nameplate]
    for n in wrong[:3]:
        err = error_of(h.join(n, "192.0.2.66"))
        assert err.code == "unknown_code" and f"no open pairing code starts with {n}" in err.message
    err = error_of(h.join(nameplate, "192.0.2.66"))
    assert err.code == "too_many_guesses" and "too many failed pairing attempts" in err.message
    assert h.m.stats.refused_claims == 4 and h.m.book.is_open(nameplate)
    h.join(nameplate)
    h.advance(1)
    assert isinstance(sharer.last(), Fire)
    err = error_of(h.join(nameplate, "192.0.2.67"))
    assert err.code == "used" and "already used" in err.message


def test_a_symmetric_sharer_asks_a_joiner_without_probe_for_one() -> None:
    h = Harness()
    sharer, nameplate = h.share(probe=Endpoint(SHARER_IP, 4999))  # != observed: symmetric
    joiner = h.join(nameplate)
    assert error_of(joiner).code == "probe_required"
    assert h.m.book.is_open(nameplate) and h.m.stats.refused_claims == 0
    # The joiner probed: a stable mapping. The pairing goes ahead, with the symmetric
    # sharer connecting and a short budget.
    again = h.join(nameplate, probe=Endpoint(JOINER_IP, 40000 + h._next + 1))
    h.advance(1)
    s, j = fires(sharer, again)
    assert s.mapping == ("symmetric", "stable") and j.mapping == ("stable", "symmetric")
    assert [(st.punch, st.budget) for st in s.plan] == [("connect", 4.0)]
    assert s.note is not None and "your NAT is symmetric" in s.note


def test_two_symmetric_peers_are_refused_at_once() -> None:
    h = Harness()
    sharer, nameplate = h.share(probe=Endpoint(SHARER_IP, 4999))
    joiner = h.join(nameplate, probe=Endpoint(JOINER_IP, 5999))
    for p in (sharer, joiner):
        err = error_of(p)
        assert err.code == "symmetric_nat" and "both peers are behind symmetric NATs" in err.message
        assert p.sent_at[-1][0] == h.now
    assert h.m.stats.paired == 0 and not h.m.retries


# Retries --------------------------------------------------------------------------------------


def paired(h: Harness) -> tuple[int, Peer, Peer]:
    sharer, nameplate = h.share()
    joiner = h.join(nameplate)
    h.advance(1)
    fires(sharer, joiner)
    return nameplate, sharer, joiner


def test_both_sides_can_coordinate_a_failed_pairing_again() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    pa, pb = Pake("server", "x").message, Pake("client", "x").message
    sharer = h.join(nameplate, SHARER_IP, rtt=0.02, action="reshare", pake=pa)
    assert sharer.messages() == []  # it waits for the joiner
    h.advance(RETRY_WAIT - 1)
    joiner = h.join(nameplate, rtt=0.02, action="rejoin", pake=pb)
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert (s.peer_pake, j.peer_pake) == (pb, pa) and s.peer_public == j.public
    assert h.m.stats.paired == 2 and h.m.retries[nameplate].left == MAX_RETRIES - 1


def test_a_retry_without_kernel_rtt_is_pinged_once_then_waits() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    sharer = h.join(nameplate, SHARER_IP, rtt=None, action="reshare")
    assert sharer.messages() == [Ping(1)]
    h.advance(0.05)
    h.send(sharer, encode(Pong(1)))
    assert h.m.retries[nameplate].waiting == ("sharer", sharer.id)
    joiner = h.join(nameplate, rtt=0.01, action="rejoin")
    assert h.m.next_deadline == pytest.approx(h.now + FIRE_MARGIN)  # the sharer's is slower
    h.advance(FIRE_MARGIN)
    s, _ = fires(sharer, joiner)
    assert s.rtt_ms == 30.0  # (50 + 10) / 2


def test_a_retry_waits_ten_seconds_for_the_other_side() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    joiner = h.join(nameplate, action="rejoin")
    h.advance(RETRY_WAIT - 0.01)
    assert joiner.messages() == []
    h.advance(0.01)
    err = error_of(joiner)
    assert err.code == "timeout" and err.message == "the peer did not retry within 10 s"


def test_retries_come_from_where_each_side_paired_and_are_limited() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    never = error_of(h.join(nameplate + 1 if nameplate < 999_999 else 1, action="rejoin"))
    assert never.code == "unknown_code" and "never paired" in never.message
    elsewhere = error_of(h.join(nameplate, "192.0.2.99", action="rejoin"))
    assert elsewhere.code == "unknown_code"
    wrong_side = error_of(h.join(nameplate, JOINER_IP, action="reshare"))
    assert wrong_side.code == "unknown_code"  # the joiner's IP is not the sharer's
    first = h.join(nameplate, action="rejoin")
    twice = error_of(h.join(nameplate, action="rejoin"))
    assert twice.code == "bad_request"
    assert "a retry from the joiner is already waiting" in twice.message
    assert first.messages() == []
    h.advance(RETRY_WAIT)
    for _ in range(MAX_RETRIES):
        s = h.join(nameplate, SHARER_IP, action="reshare")
        j = h.join(nameplate, action="rejoin")
        h.advance(1)
        fires(s, j)
    spent = error_of(h.join(nameplate, action="rejoin"))
    assert spent.code == "unknown_code" and "retries are spent" in spent.message


def test_a_retry_slot_lasts_until_well_after_the_punch() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    until = h.m.retries[nameplate].until
    h.advance(until - h.now + 0.01)
    assert error_of(h.join(nameplate, action="rejoin")).code == "unknown_code"


def test_a_lost_retry_waiter_still_counts_until_its_wait_ends() -> None:
    h = Harness()
    nameplate, _, _ = paired(h)
    joiner = h.join(nameplate, action="rejoin")
    open_now = h.m.stats.open_now
    assert h.lost(joiner) == []
    assert h.m.stats.open_now == open_now
    sharer = h.join(nameplate, SHARER_IP, action="reshare")
    h.advance(1)
    assert isinstance(sharer.last(), Fire)  # the other side goes ahead
    assert joiner.messages() == [] and h.m.stats.open_now == open_now


# Shutdown and robustness -----------------------------------------------------------------------


def test_shutdown_resets_coordinated_connections_then_everything() -> None:
    h = Harness()
    sharer, _ = h.share()
    seed = h.connect()
    assert h.feed(Shutdown(h.now)) == [Reset(sharer.id)]
    assert h.feed(Shutdown(h.now, force=True)) == [Reset(seed.id)]
    assert h.m.stats.open_now == 0 and h.m.next_deadline is None


class ExplodingBook(NameplateBook[ConnId]):
    def allocate(self, owner: ConnId, *, now: float | None = None) -> tuple[int, float]:
        raise RuntimeError("the store is down")


def test_a_failure_inside_costs_one_connection_and_one_line() -> None:
    h = Harness(book=ExplodingBook(PairingLimits()))
    seed = h.connect()
    for i in range(3):
        peer = h.hello(SHARE, f"192.0.2.{i}")
        assert peer.ended == "reset"
    assert len(h.logs) == 1 and h.logs[0].kind == "internal"
    assert "RuntimeError: the store is down" in h.logs[0].line
    assert seed.ended is None and h.m.stats.open_now == 1
    assert h.connect().data  # everyone else is served


def test_an_owner_is_told_apart_by_equality() -> None:
    b: NameplateBook[int] = NameplateBook(PairingLimits())
    n, _ = b.allocate(10**30, now=0)
    b.release(n, 10**30 + 0, now=1)  # equal, not the same object
    with pytest.raises(ClaimRefused, match="stopped waiting"):
        b.claim(n, "x", now=2)


# Anything at all --------------------------------------------------------------------------------


client_frames = st.sampled_from([
    encode(SHARE), encode(Probe()), encode(Pong(1)), encode(Pong(2)), encode(Pong(3)),
    encode(PakeMessage(Pake("server", "1-a-b").message)),
    encode(Hello("join", 1, (LAN_B,), None, 10)), encode(Hello("join", 2, (), None, 5)),
    encode(Hello("rejoin", 1, (), None, 5)), encode(Hello("reshare", 1, (), None, 5)),
])
chunks = st.one_of(st.binary(max_size=64), client_frames,
                   client_frames.flatmap(lambda f: st.integers(1, len(f) - 1).map(
                       lambda i: f[:i])))
ops = st.sampled_from(["connect", "send", "close", "lost", "advance", "share", "join", "join",
                       "retry", "pong", "pong"])
steps = st.lists(st.tuples(ops, st.integers(0, 7), chunks, st.floats(0, 20),
                           st.sampled_from(["198.51.100.1", "203.0.113.1", "192.0.2.1"])),
                 max_size=40)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_no_sequence_of_events_breaks_the_machine(script: list[tuple[str, int, bytes, float,
                                                                     str]]) -> None:
    h = Harness(ServerLimits(max_connections=6, max_per_source=4,
                             pairing=PairingLimits(code_lifetime=30, max_failed_claims=3)))
    for op, which, data, dt, ip in script:
        target = h.live_peer(which)
        plates = h.nameplates()
        plate = plates[which % len(plates)]
        if op == "share":
            h.hello(SHARE, ip, rtt=0.01 * which or None)
        elif op == "join":
            h.hello(Hello("join", plate, (LAN_B,), None, 10), ip, rtt=0.01 * which or None,
                    syn_data=which == 7)
        elif op == "retry":
            h.hello(Hello("reshare" if which % 2 else "rejoin", plate, (), None, 5), ip,
                    rtt=0.01 * which or None)
        elif op == "connect" or target is None:
            h.connect(ip)
        elif op == "send":
            h.send(target, data, rtt=0.01 if which % 2 else None)
        else:
            h.fuzz_op(op, target, which, dt)
        h.invariants()
        assert not [x for x in h.logs if x.kind == "internal"], h.logs
    event(f"paired: {min(h.m.stats.paired, 2)}")
    # Whatever happened, every connection ends within bounded time...
    h.advance(1000)
    assert h.m.stats.open_now == 0 and not h.m.conns and h.m.next_deadline is None
    # ...and a newcomer is served.
    late = h.connect("192.0.2.200")
    assert late.ended is None and len(late.data) == REPLY_SIZE
    # Every served peer got its own address first, then only valid frames.
    for p in h.peers.values():
        if p.data:
            ip, port = decode_reply(p.reply)
            assert port == 40000 + p.id
            p.messages()
