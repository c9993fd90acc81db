"""The NAT doctor's responder machine, on bytes and a fake clock: no sockets, no loop."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.rendezvous.doctor_machine import (
    Accepted,
    Action,
    CancelDial,
    Close,
    Dial,
    Dialed,
    DoctorLimits,
    Event,
    Log,
    Lost,
    PeerClosed,
    Received,
    Reset,
    ResponderMachine,
    Send,
    Shutdown,
    Tick,
    source_key,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import (
    Check,
    DialBack,
    DoctorError,
    FrameReader,
    Icmp,
    Seen,
    decode_responder_message,
    encode,
)

PEER = ("203.0.113.2", 40000)
LOCAL = ("198.51.100.2", 3013)
SECOND = "198.51.100.3"


def sent(actions: list[Action], conn: int = 1) -> list[object]:
    """The messages sent on ``conn``, decoded."""
    reader = FrameReader()
    out: list[object] = []
    for a in actions:
        if isinstance(a, Send) and a.conn == conn:
            out += [decode_responder_message(f) for f in reader.feed(a.data)]
    return out


def dials(actions: list[Action]) -> list[Dial]:
    return [a for a in actions if isinstance(a, Dial)]


def logs(actions: list[Action]) -> list[str]:
    return [a.line for a in actions if isinstance(a, Log)]


def check(dial_back: bool = True, wait_ms: int = 500) -> bytes:
    return encode(Check(dial_back, wait_ms))


def ask(m: ResponderMachine, conn: int, data: bytes, now: float = 0.0,
        peer: tuple[str, int] = PEER, local: tuple[str, int] = LOCAL) -> list[Action]:
    return m.handle(Accepted(conn, peer, now, local=local)) + m.handle(Received(conn, data, now))


# -- what it answers -----------------------------------------------------------------------


def test_seen_tells_the_source_and_the_other_addresses_then_closes() -> None:
    m = ResponderMachine(addresses=(LOCAL[0], SECOND, "2001:db8::2"))
    out = ask(m, 1, check(dial_back=False))
    assert sent(out) == [Seen(Endpoint(*PEER), (SECOND, "2001:db8::2"))]
    assert out[-1] == Close(1) and not dials(out)


def test_a_dial_back_goes_to_the_source_from_another_address_and_is_reported() -> None:
    m = ResponderMachine(addresses=(SECOND,))
    out = ask(m, 1, check(wait_ms=700))
    assert sent(out) == [Seen(Endpoint(*PEER), (SECOND,))]
    assert dials(out) == [Dial(1, PEER, SECOND, 0.7)]
    out = m.handle(Dialed(1, "icmp", (SECOND, 50000), 0.1, 0.021, Icmp(3, 13, "203.0.113.2")))
    assert sent(out) == [DialBack("icmp", Endpoint(SECOND, 50000), 21,
                                  Icmp(3, 13, "203.0.113.2"))]
    assert out[-1] == Close(1)
    assert m.stats.dials == 1 and m.dials_under_way == 0


def test_with_one_address_the_dial_back_comes_from_it_on_another_port() -> None:
    m = ResponderMachine()
    assert dials(ask(m, 1, check())) == [Dial(1, PEER, LOCAL[0], 0.5)]
    # an IPv6 client of a responder that announces only IPv4 addresses
    m = ResponderMachine(addresses=(SECOND,))
    out = ask(m, 2, check(), peer=("2001:db8::9", 5), local=("2001:db8::1", 3013))
    assert dials(out) == [Dial(2, ("2001:db8::9", 5), "2001:db8::1", 0.5)]


def test_ipv4_mapped_peers_are_plain_ipv4() -> None:
    m = ResponderMachine()
    out = ask(m, 1, check(), peer=("::ffff:203.0.113.2", 40000),
              local=("::ffff:198.51.100.2", 3013))
    assert sent(out)[0] == Seen(Endpoint(*PEER), ())
    assert dials(out) == [Dial(1, PEER, LOCAL[0], 0.5)]


@pytest.mark.parametrize(("outcome", "icmp"), [("open", None), ("rst", None), ("drop", None),
                                               ("icmp", None)])
def test_every_outcome_is_reported(outcome: str, icmp: Icmp | None) -> None:
    m = ResponderMachine()
    ask(m, 1, check())
    out = m.handle(Dialed(1, outcome, ("198.51.100.2", 1234), 1.0, 0.5, icmp))  # type: ignore[arg-type]
    assert sent(out) == [DialBack(outcome, Endpoint("198.51.100.2", 1234), 500)]  # type: ignore[arg-type]


def test_a_dial_that_could_not_be_made_is_an_error_and_a_log_line() -> None:
    m = ResponderMachine()
    ask(m, 1, check())
    out = m.handle(Dialed(1, None, None, 0.1, error="cannot bind 192.0.2.1: address not "
                          "available"))
    [err] = sent(out)
    assert isinstance(err, DoctorError) and err.code == "dial_failed"
    assert "cannot bind" in err.message and len(logs(out)) == 1


# -- not a scanner ------------------------------------------------------------------------------


def test_a_check_naming_a_target_is_refused_and_nothing_is_dialed() -> None:
    m = ResponderMachine()
    body = json.dumps({"type": "check", "version": 1, "dial_back": True, "wait_ms": 500,
                       "target": "192.0.2.9:22"}).encode()
    out = ask(m, 1, struct.pack("!I", len(body)) + body)
    [err] = sent(out)
    assert isinstance(err, DoctorError) and err.code == "bad_request" and "target" in err.message
    assert not dials(out) and len(logs(out)) == 1


events = st.lists(st.one_of(
    st.tuples(st.just("accept"), st.integers(1, 6),
              st.sampled_from(["203.0.113.2", "203.0.113.3", "2001:db8::7", "::ffff:192.0.2.9"]),
              st.integers(1, 65535)),
    st.tuples(st.just("data"), st.integers(1, 6), st.sampled_from([
        check(), check(False), check(True, 3000), check()[:3], check()[3:], b"\x00" * 9,
        check() + check(), encode(Check(True, 100))[:-1]])),
    st.tuples(st.just("bytes"), st.integers(1, 6), st.binary(max_size=40)),
    st.tuples(st.just("dialed"), st.integers(1, 6), st.sampled_from(["open", "rst", "drop"])),
    st.tuples(st.just("fin"), st.integers(1, 6)),
    st.tuples(st.just("lost"), st.integers(1, 6)),
    st.tuples(st.just("tick"), st.floats(0, 30)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(events)
def test_whatever_happens_it_dials_only_the_source_and_never_twice_per_connection(
        script: list[tuple[object, ...]]) -> None:
    m = ResponderMachine(DoctorLimits(dial_burst=3), addresses=(SECOND,))
    now = 0.0
    peers: dict[int, tuple[str, int]] = {}
    accepted: set[int] = set()
    dialed: list[int] = []
    next_id = 100
    for step in script:
        kind = step[0]
        if kind == "accept":
            _, _, ip, port = step
            next_id += 1
            peers[next_id] = (str(ip), int(port))  # type: ignore[call-overload]
            accepted.add(next_id)
            ev: Event = Accepted(next_id, peers[next_id], now, local=LOCAL)
        elif kind == "tick":
            now += float(step[1])  # type: ignore[arg-type]
            ev = Tick(now)
        else:
            conn = 100 + int(step[1])  # type: ignore[call-overload]
            if kind == "data" or kind == "bytes":
                ev = Received(conn, step[2], now)  # type: ignore[arg-type]
            elif kind == "dialed":
                ev = Dialed(conn, step[2], (SECOND, 9), now)  # type: ignore[arg-type]
            elif kind == "fin":
                ev = PeerClosed(conn, now)
            else:
                ev = Lost(conn, now)
        for action in m.handle(ev):
            if isinstance(action, Dial):
                ip, port = peers[action.conn]
                plain = ip.removeprefix("::ffff:")
                assert action.target == (plain, port)
                assert action.source in (SECOND, LOCAL[0]) or ":" in plain
                assert 0.1 <= action.timeout <= 3.0
                dialed.append(action.conn)
    assert len(dialed) == len(set(dialed))
    assert m.open_connections <= len(accepted)


# -- rate limits ----------------------------------------------------------------------------------


def test_dial_backs_are_rate_limited_per_source_with_one_log_line_per_refusal() -> None:
    lim = DoctorLimits(dial_burst=3, dial_interval=10.0)
    m = ResponderMachine(lim)
    for conn in (1, 2, 3):
        assert dials(ask(m, conn, check(), now=0.0))
        m.handle(Dialed(conn, "drop", (LOCAL[0], 9), 0.5))
    out = ask(m, 4, check(), now=1.0)
    assert not dials(out)
    seen, err = sent(out, 4)
    assert isinstance(seen, Seen)  # the address is still told
    assert isinstance(err, DoctorError) and err.code == "rate_limited"
    assert err.retry_in is not None and 9.0 <= err.retry_in <= 10.1
    [line] = logs(out)
    assert "203.0.113.2" in line and "refused a dial-back" in line
    assert m.stats.refused_rate == 1
    # another source is not affected
    assert dials(ask(m, 5, check(), now=1.0, peer=("192.0.2.2", 5)))
    # a check without dial-back is never refused
    assert sent(ask(m, 6, check(False), now=1.0), 6) == [Seen(Endpoint(*PEER), ())]
    # one token back after the interval, not more
    assert dials(ask(m, 7, check(), now=10.5))
    assert not dials(ask(m, 8, check(), now=10.6))


def test_an_ipv6_subscriber_is_one_source_per_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    m = ResponderMachine(DoctorLimits(dial_burst=1))
    assert dials(ask(m, 1, check(), peer=("2001:db8:1:2::1", 5), local=("2001:db8::1", 3013)))
    assert not dials(ask(m, 2, check(), peer=("2001:db8:1:2::2", 5),
                         local=("2001:db8::1", 3013)))


def test_dial_backs_under_way_are_capped() -> None:
    m = ResponderMachine(DoctorLimits(max_dials=2))
    assert dials(ask(m, 1, check(), peer=("192.0.2.1", 1)))
    assert dials(ask(m, 2, check(), peer=("192.0.2.2", 1)))
    out = ask(m, 3, check(), peer=("192.0.2.3", 1))
    assert not dials(out) and sent(out, 3)[-1] == DoctorError(
        "busy", "too many dial-backs under way; try again in a few seconds")
    m.handle(Dialed(1, "open", (LOCAL[0], 9), 0.1))
    assert dials(ask(m, 4, check(), peer=("192.0.2.4", 1)))


def test_refusal_lines_are_bounded_then_counted() -> None:
    m = ResponderMachine(DoctorLimits(dial_burst=1, log_burst=3, log_interval=10.0,
                                      max_per_source=100))
    lines: list[str] = []
    for conn in range(1, 12):
        lines += logs(ask(m, conn, check(), now=0.0))
    assert len(lines) == 3  # 10 refusals, 3 lines
    assert dials(ask(m, 50, check(), now=11.0))  # a token again: granted, nothing logged
    lines = logs(ask(m, 51, check(), now=11.0))
    assert lines[0] == "7 more refusal(s) not logged in the last 10 s"
    assert "refused a dial-back" in lines[1]


def test_rate_limit_entries_are_bounded() -> None:
    m = ResponderMachine(DoctorLimits(max_sources=50))
    for i in range(500):
        ask(m, i + 1, check(), peer=(f"192.0.{i // 250}.{i % 250 + 1}", 1))
    assert m.tracked_sources == 50


def test_connections_are_capped_globally_and_per_source() -> None:
    m = ResponderMachine(DoctorLimits(max_connections=3, max_per_source=2))
    assert m.handle(Accepted(1, PEER, 0, local=LOCAL)) == []
    assert m.handle(Accepted(2, PEER, 0, local=LOCAL)) == []
    out = m.handle(Accepted(3, PEER, 0, local=LOCAL))
    assert out[0] == Reset(3) and "too many open" in logs(out)[0]
    assert m.handle(Accepted(4, ("192.0.2.1", 1), 0, local=LOCAL)) == []
    assert m.handle(Accepted(5, ("192.0.2.2", 1), 0, local=LOCAL))[0] == Reset(5)
    m.handle(Lost(1, 0))
    assert m.handle(Accepted(6, PEER, 0, local=LOCAL)) == []
    assert m.handle(Accepted(7, None, 0, local=None)) == [Reset(7)]


# -- every phase has an end --------------------------------------------------------------------


@given(st.lists(st.integers(1, 40), max_size=6), st.booleans())
def test_a_check_split_anyhow_is_answered_the_same(cuts: list[int], dial_back: bool) -> None:
    data = check(dial_back)
    m = ResponderMachine()
    m.handle(Accepted(1, PEER, 0, local=LOCAL))
    out: list[Action] = []
    points = sorted({min(c, len(data)) for c in cuts})
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        out += m.handle(Received(1, data[a:b], 0))
    assert sent(out) == [Seen(Endpoint(*PEER), ())]
    assert bool(dials(out)) == dial_back


@pytest.mark.parametrize(("data", "code"), [
    (check() + check(), "bad_request"),
    (b"\x00\x00\x10\x01", "bad_request"),
    (encode(Check(True, 500)).replace(b'"version":1', b'"version":7'), "unsupported_version"),
])
def test_bad_bytes_get_an_error_and_a_close(data: bytes, code: str) -> None:
    m = ResponderMachine()
    out = ask(m, 1, data)
    [err] = sent(out)
    assert isinstance(err, DoctorError) and err.code == code
    assert out[-1] == Close(1) and not dials(out)


def test_silence_is_closed_and_a_partial_check_is_refused_at_the_deadline() -> None:
    lim = DoctorLimits(check_timeout=2.0, write_timeout=5.0)
    m = ResponderMachine(lim)
    m.handle(Accepted(1, PEER, 0, local=LOCAL))
    m.handle(Accepted(2, ("192.0.2.1", 1), 0, local=LOCAL))
    m.handle(Received(2, check()[:5], 0))
    assert m.next_deadline == 2.0
    out = m.handle(Tick(2.0))
    assert Close(1) in out and Close(2) in out
    [err] = sent(out, 2)
    assert isinstance(err, DoctorError) and "incomplete" in err.message
    assert m.next_deadline == 7.0
    out = m.handle(Tick(7.0))  # the closes did not complete: reset
    assert set(out) == {Reset(1), Reset(2)} and m.open_connections == 0
    assert m.next_deadline is None


def test_a_dial_that_never_reports_is_given_up() -> None:
    m = ResponderMachine(DoctorLimits(dial_grace=1.0))
    ask(m, 1, check(wait_ms=500))
    assert m.next_deadline == 1.5
    out = m.handle(Tick(1.5))
    assert out == [CancelDial(1), Reset(1)]
    assert m.dials_under_way == 0 and m.handle(Dialed(1, "open", (LOCAL[0], 9), 2.0)) == []


def test_a_client_that_leaves_cancels_its_dial() -> None:
    m = ResponderMachine()
    ask(m, 1, check())
    assert m.handle(PeerClosed(1, 0.1)) == [CancelDial(1), Close(1)]
    ask(m, 2, check())
    assert m.handle(Lost(2, 0.1)) == [CancelDial(2)]
    assert m.dials_under_way == 0 and m.open_connections == 1  # 1 is closing


def test_after_the_answer_more_bytes_are_ignored() -> None:
    m = ResponderMachine()
    ask(m, 1, check(False))
    assert m.handle(Received(1, check(), 0.1)) == []
    assert m.handle(PeerClosed(1, 0.1)) == []
    assert m.handle(Lost(1, 0.1)) == [] and m.open_connections == 0


def test_shutdown_resets_everything_and_refuses_new_connections() -> None:
    m = ResponderMachine()
    ask(m, 1, check())
    m.handle(Accepted(2, ("192.0.2.1", 1), 0, local=LOCAL))
    out = m.handle(Shutdown(0.2))
    assert CancelDial(1) in out and Reset(1) in out and Reset(2) in out
    assert m.handle(Accepted(3, PEER, 0.3, local=LOCAL)) == [Reset(3)]
    assert m.open_connections == 0 and m.dials_under_way == 0
