"""The coordinated peer's machine on bytes: the rendezvous conversation from port P, split
and merged reads, pings, probes, refusals, timeouts, retries and budgets. No sockets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.errors import NopfError
from nopf_web.punch.machine import Failure, PunchConfig, PunchTimeout
from nopf_web.rendezvous.errors import (
    RendezvousError,
    RendezvousProtocolError,
    RendezvousUnreachable,
)
from nopf_web.roles import PeerRole
from nopf_web.sessions import errors
from nopf_web.sessions.coordination_machine import (
    FIRE_GRACE,
    MAX_ATTEMPTS,
    MAX_REREGISTER,
    MIN_ATTEMPT,
    RETRY_WAIT,
    AwaitHandshake,
    Close,
    Connect,
    CoordinationConfig,
    CoordinationMachine,
    Fail,
    FinishPake,
    Fired,
    MakePake,
    Met,
    OpenPath,
    Paired,
    Punch,
    Resume,
    Say,
    Send,
    ShowCode,
    Succeed,
    Timings,
    ViaRelay,
    refusal,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import encode_reply6
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    ERROR_CODES,
    RESUME_WAIT,
    Candidate,
    ErrorReply,
    Fire,
    Hello,
    PakeMessage,
    Ping,
    Pong,
    RelayStage,
    Stage,
    Welcome,
)

from .coordination_peer import (
    CODE,
    LOCAL,
    NET,
    OUR_PAKE,
    OWNER,
    PEER,
    PUBLIC,
    RDV,
    Peer,
    frames,
    reply,
)

PEER_LAN = Endpoint("10.0.0.3", 50000)
PEER_PAKE = b"B" + bytes(range(32))


def fire(*stages: Stage, mapping: tuple[str, str] | None = None,
         peer_pake: bytes | None = PEER_PAKE,
         note: str | None = None) -> Fire:
    plan = stages or (Stage("public", PEER, "connect", 4.0),)
    return Fire(PUBLIC, PEER, plan, 40.0, note, peer_pake, mapping)  # type: ignore[arg-type]


cut_points = st.lists(st.integers(1, 400), max_size=12)


def the_paths(p: Peer) -> list[OpenPath]:
    return [a for a in p.actions if isinstance(a, OpenPath)]


def punches(p: Peer) -> list[Punch]:
    """The punch paths opened, in order."""
    return [a.how for a in the_paths(p) if isinstance(a.how, Punch)]


# -- the whole conversation --------------------------------------------------------------


def share(cuts: Iterable[int] = (), deferred: bool = False) -> Peer:
    p = Peer("server", punch_timeout=30.0)
    p.start()
    port = p.probe()  # the sharer checks its mapping first, from a fresh port
    hello_conn = p.connect(deferred=deferred)
    assert p.last(Connect) == Connect(hello_conn, port, fastopen=True)
    assert p.client_frames(hello_conn) == [
        Hello("share", None, (Endpoint(LOCAL, port),), PUBLIC, 15.0, relay=True,
              nat=NatSummary(), owner=OWNER)]  # no report: a report of nothing
    p.says(hello_conn, reply() + frames(Ping(1), Welcome(7, 600.0, PUBLIC), Ping(2), fire()),
           cuts)
    return p


@settings(max_examples=200)
@given(cuts=cut_points, deferred=st.booleans())
def test_share_from_probe_to_fire_in_any_reads(cuts: list[int], deferred: bool) -> None:
    p = share(cuts, deferred)
    hello_conn = 2
    assert p.client_frames(hello_conn)[1:] == [Pong(1), PakeMessage(OUR_PAKE), Pong(2)]
    assert p.said()[:2] == [f"public address {PUBLIC} (local port 40001)",
                            "pairing code 7-orbit-lantern (valid 10 min)"]
    assert p.of(ShowCode) == [ShowCode("7-orbit-lantern")]
    assert p.of(MakePake) == [MakePake("7-orbit-lantern")]
    stage = fire().plan[0]
    local = Endpoint("0.0.0.0", 40001)
    tail = p.actions[-5:]
    # The fire names no mappings and neither side sent a NAT report: a public path is
    # predicted, assuming both NATs keep their ports (not certain).
    prediction = p.machine.prediction
    assert prediction is not None and prediction.path == "public" and not prediction.certain
    assert tail == [
        Close(hello_conn),
        Fired(1, fire(), prediction),
        Say(f"punching to {PEER} (public, connect)", punching=True),
        OpenPath(1, Punch(local, stage, PunchConfig(timeout=4.0, arm_ttl=2, first_shot=True),
                          None)),
        FinishPake(PEER_PAKE),
    ]
    p.now = 0.5
    done = p.feed(p.machine.path_opened(1, p.now))
    assert done == [
        Say(f"tunnel up to {PEER} over the public path"),
        Succeed(1, Paired("server", "7-orbit-lantern", PEER, "public", local, PUBLIC, 0.04,
                          Timings(0.0, 0.0, 0.0, 0.5, 0.0, 0.0), peer_pake=PEER_PAKE,
                          prediction=prediction)),
    ]
    assert p.machine.wake_at is None


@settings(max_examples=200)
@given(cuts=cut_points)
def test_connect_sends_its_pake_in_the_hello_and_answers_pings(cuts: list[int]) -> None:
    p = Peer("client", punch_timeout=30.0)
    assert p.start() == [Connect(1, 0, fastopen=True), MakePake("7-orbit-lantern")]
    conn = p.connect()
    [hello] = p.client_frames(conn)
    assert hello == Hello("join", 7, (Endpoint(LOCAL, 40001),), None, 15.0, pake=OUR_PAKE,
                          nat=NatSummary(),
                          relay=True)
    p.now = 0.1
    lan_stage = Stage("lan", PEER_LAN, "arm", 1.0)
    p.says(conn, reply() + frames(Ping(5), Ping(6), fire(lan_stage, Stage("public", PEER,
                                                                         "connect", 3.0))),
           cuts)
    assert p.client_frames(conn)[1:] == [Pong(5), Pong(6)]
    paths = punches(p)
    assert [o.stage for o in paths] == [lan_stage]  # one rung at a time
    assert paths[0].config == PunchConfig(timeout=1.0, arm_ttl=0, first_shot=False)
    assert p.of(FinishPake) == [FinishPake(PEER_PAKE)]
    p.feed(p.machine.path_failed(1, PunchTimeout("lan: no", Counter()), p.now))
    assert [o.stage.path for o in punches(p)] == ["lan", "public"]
    assert p.of(FinishPake) == [FinishPake(PEER_PAKE)]  # once per attempt
    [succeed] = [a for a in p.feed(p.machine.path_opened(2, 0.2)) if isinstance(a, Succeed)]
    assert succeed.paired.role == "client" and succeed.paired.path == "public"
    assert succeed.paired.timings == Timings(0.0, 0.0, 0.1, 0.2, None, 0.0)


def test_a_fast_open_hello_waits_for_its_handshake_before_the_address_clock() -> None:
    p = Peer("client")
    p.start()
    p.feed(p.machine.connected(1, Endpoint(LOCAL, 40001), True, 0.0))
    assert p.actions[-2:] == [Send(1, p.sent[1]), AwaitHandshake(1)]
    assert p.machine.wake_at is None  # the driver times the handshake
    p.feed(p.machine.established(1, 0.3))
    assert p.machine.wake_at == 0.3 + NET
    # A failed first send: it never connected.
    q = Peer("client")
    q.start()
    q.feed(q.machine.connected(1, Endpoint(LOCAL, 40001), True, 0.0))
    q.closes(1, "Connection refused")
    error = q.failure()
    assert isinstance(error, RendezvousUnreachable)
    assert str(error) == f"rendezvous {RDV}: Connection refused"


def test_without_pake_neither_message_travels() -> None:
    p = Peer("client", pake=False)
    assert p.start() == [Connect(1, 0, fastopen=True)]
    conn = p.connect()
    assert p.client_frames(conn)[0].pake is None  # type: ignore[union-attr]
    p.says(conn, reply() + frames(fire()))
    assert not p.of(FinishPake)
    [succeed] = [a for a in p.feed(p.machine.path_opened(1, 1.0)) if isinstance(a, Succeed)]
    assert isinstance(succeed.paired, Paired)
    assert succeed.paired.peer_pake is None


def test_a_changed_mapping_is_said() -> None:
    p = Peer("server")
    p.start()
    port = p.probe()
    conn = p.connect()
    p.says(conn, reply(Endpoint(PUBLIC.host, 40999)))
    assert p.said() == [f"our NAT gave public ports {PUBLIC.port} then 40999 from local port "
                        f"{port}: it looks symmetric",
                        f"public address {PUBLIC.host}:40999 (local port {port})"]


# -- probe_required, seed-only rendezvous ---------------------------------------------------


@given(cuts=cut_points)
def test_a_joiner_asked_for_its_mapping_checks_it_from_the_same_port(cuts: list[int]) -> None:
    p = Peer("client")
    p.start()
    first = p.connect()
    port = p.ports[first]
    p.says(first, reply() + frames(ErrorReply("probe_required", "check")) + b"\0", cuts)
    assert Close(first) not in p.actions  # it reads on to the rendezvous' close
    p.closes(first)
    assert Say("the sharer's NAT is symmetric: checking ours") in p.actions
    assert p.probe(port) == port
    again = p.connect()
    assert p.last(Connect).port == port
    [hello] = p.client_frames(again)
    assert isinstance(hello, Hello) and hello.probe == PUBLIC and hello.action == "join"
    p.says(again, reply() + frames(fire()))
    assert len(the_paths(p)) == 1


def test_a_drain_that_never_ends_is_given_up_after_the_network_timeout() -> None:
    p = Peer("client")
    p.start()
    first = p.connect()
    p.says(first, reply() + frames(ErrorReply("probe_required", "check")))
    assert p.machine.wake_at == NET
    assert p.at(NET - 0.01) == []
    p.at(NET)
    assert Close(first) in p.actions and p.last(Connect).port == p.ports[first]


def test_probe_required_twice_is_a_protocol_error() -> None:
    p = Peer("server")
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(ErrorReply("probe_required", "again")))
    p.closes(conn)
    error = p.failure()
    assert isinstance(error, RendezvousProtocolError)
    assert str(error) == f"rendezvous {RDV} asked for a NAT mapping check it already had"


@pytest.mark.parametrize("ending", [None, "Connection reset by peer"])
def test_a_seed_only_rendezvous_gets_one_more_hello_then_is_named(ending: str | None) -> None:
    p = Peer("client")
    p.start()
    first = p.connect()
    p.says(first, reply())
    p.closes(first, ending)  # no frame after the discovery reply
    assert p.said()[-1].startswith("the rendezvous closed before answering our hello; trying "
                                   "once more")
    second = p.connect()  # from a fresh port (the joiner has no mapping to keep)
    again, before = p.client_frames(second)[0], p.client_frames(first)[0]
    assert second != first and isinstance(again, Hello) and isinstance(before, Hello)
    assert (again.action, again.nameplate, again.pake) == ("join", 7, OUR_PAKE) == (
        before.action, before.nameplate, before.pake)
    p.says(second, reply())
    p.closes(second, ending)
    error = p.failure()
    assert isinstance(error, errors.RendezvousTooOld)
    assert "speaks only the seed protocol" in str(error)
    assert len(p.of(Connect)) == 2


def test_a_hello_lost_once_is_answered_the_second_time() -> None:
    p = Peer("server")
    p.start()
    port = p.probe()
    first = p.connect()
    p.says(first, reply())
    p.closes(first)
    # The sharer checks its mapping again from the same port, then says hello again.
    assert p.probe(port) == port
    second = p.connect()
    p.says(second, reply() + frames(Welcome(7, 600, PUBLIC)))
    assert p.of(ShowCode) == [ShowCode("7-orbit-lantern")]
    assert not p.of(Fail)


def test_a_close_after_a_frame_is_no_seed_server() -> None:
    p = Peer("client")
    p.start()
    conn = p.connect()
    p.says(conn, reply() + frames(Ping(1)))
    p.closes(conn)
    assert str(p.failure()) == f"rendezvous {RDV} closed the connection unexpectedly"
    q = Peer("client")
    q.start()
    conn = q.connect()
    q.says(conn, reply() + frames(Ping(1)))
    q.closes(conn, "Connection reset by peer")
    assert str(q.failure()) == f"rendezvous {RDV} broke the connection (Connection reset by peer)"


# -- refusals and bad bytes ------------------------------------------------------------------

TYPED = {
    "unknown_code": errors.UnknownCode, "expired": errors.CodeExpired,
    "used": errors.CodeUsed, "too_many_guesses": errors.TooManyGuesses,
    "symmetric_nat": errors.SymmetricNat, "busy": errors.RendezvousBusy,
    "timeout": errors.PeerDidNotRetry, "bad_request": errors.RendezvousRejected,
    "unsupported_version": errors.RendezvousRejected, "relay_refused": errors.RelayRefused,
}


def test_every_error_code_but_probe_required_has_its_type() -> None:
    assert set(TYPED) == ERROR_CODES - {"probe_required"}
    for code, kind in TYPED.items():
        error = refusal(ErrorReply(code, "why"), RDV)
        assert type(error) is kind
        assert str(error) in ("why", f"rendezvous {RDV}: why")


@pytest.mark.parametrize("code", sorted(TYPED))
@pytest.mark.parametrize("role", ["server", "client"])
def test_a_refusal_ends_the_meeting_with_its_type(code: str, role: PeerRole) -> None:
    p = Peer(role)
    p.start()
    if role == "server":
        p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(ErrorReply(code, "no")) + frames(Ping(9)))
    assert isinstance(p.failure(), TYPED[code])
    assert Close(conn) in p.actions
    assert p.client_frames(conn)[1:] == []  # nothing read after the refusal
    assert p.machine.wake_at is None and not the_paths(p)


def test_a_code_that_expires_while_the_sharer_waits_means_nobody_came() -> None:
    p = Peer("server")
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(Welcome(7, 600, PUBLIC),
                                  ErrorReply("expired", "nobody used the pairing code within "
                                                        "10 min")))
    error = p.failure()
    assert isinstance(error, errors.PeerNeverArrived)
    assert str(error) == "the peer never arrived: nobody used the pairing code within 10 min"


@pytest.mark.parametrize(("data", "says"), [
    (b"\x01\x02\x03\x04\x00\x05NOPE", "no END\\0 trailer"),
    (reply() + b"\x00\x00\x20\x00", "frame length 8192 is out of range"),
    (reply() + b"\x00\x00\x00\x02{}", "unexpected message type"),
    (reply() + b"\x00\x00\x00\x01\xff", "not UTF-8"),
])
def test_bytes_that_are_not_the_protocol_are_named(data: bytes, says: str) -> None:
    p = Peer("client")
    p.start()
    conn = p.connect()
    p.says(conn, data)
    error = p.failure()
    assert isinstance(error, RendezvousProtocolError)
    assert str(error).startswith(f"rendezvous {RDV}: ") and says in str(error)


def test_unexpected_messages_are_named() -> None:
    p = Peer("server")
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(fire()))
    assert str(p.failure()).startswith(f"rendezvous {RDV} sent Fire(")
    assert str(p.failure()).endswith("instead of a nameplate")
    q = Peer("client")
    q.start()
    conn = q.connect()
    q.says(conn, reply() + frames(Welcome(3, 60, PUBLIC)))
    assert str(q.failure()) == (f"rendezvous {RDV} sent Welcome where a fire instruction was "
                                "due")


def test_closes_before_the_discovery_reply_are_named() -> None:
    p = Peer("client")
    p.start()
    conn = p.connect()
    p.says(conn, reply()[:4])
    p.closes(conn)
    assert str(p.failure()) == (f"rendezvous {RDV} closed before its discovery reply (is it a "
                                "nopf-server?)")
    q = Peer("server")
    q.start()
    conn = q.connect()
    q.closes(conn, "Connection reset by peer")
    assert str(q.failure()) == f"rendezvous {RDV} broke the connection (Connection reset by peer)"


def test_a_failed_connect_is_the_meetings_failure() -> None:
    p = Peer("client")
    p.start()
    unreachable = RendezvousUnreachable(f"rendezvous {RDV}: Connection refused")
    p.feed(p.machine.connect_failed(1, unreachable, 0.0))
    assert p.failure() is unreachable


# -- timeouts say what they waited for -----------------------------------------------------


def waited(p: Peer) -> BaseException:
    deadline = p.machine.wake_at
    assert deadline is not None
    assert p.at(deadline - 0.001) == []
    p.at(deadline)
    return p.failure()


def test_the_probe_answer_is_timed() -> None:
    p = Peer("server")
    p.start()
    p.now = 1.0
    conn = p.connect()
    p.says(conn, reply())  # then never closes
    error = waited(p)
    assert isinstance(error, RendezvousProtocolError) and p.now == 1.0 + NET
    assert str(error) == (f"rendezvous {RDV} did not answer a probe within 5 s (is it a "
                          "nopf-server?)")


def test_the_address_is_timed() -> None:
    p = Peer("client")
    p.start()
    p.connect()
    assert str(waited(p)) == (f"rendezvous {RDV} sent no address within 5 s (is it a "
                              "nopf-server?)")


def test_the_nameplate_is_timed() -> None:
    p = Peer("server")
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(Ping(1)))
    assert str(waited(p)) == f"rendezvous {RDV} sent no pairing code (nameplate) within 5 s"


def test_the_sharers_wait_for_a_peer_is_its_code_lifetime_from_the_start() -> None:
    p = Peer("server", code_lifetime=60.0)
    p.start()
    p.probe()
    conn = p.connect()
    p.now = 2.0
    p.says(conn, reply() + frames(Welcome(7, 600, PUBLIC)))
    p.now = 30.0
    p.says(conn, frames(Ping(1)))  # pings do not extend it
    error = waited(p)
    assert isinstance(error, errors.PeerNeverArrived) and p.now == 60.0
    assert str(error) == "no peer used the pairing code within 60 s"


def test_the_joiners_fire_is_timed() -> None:
    p = Peer("client")
    p.start()
    conn = p.connect()
    p.says(conn, reply() + frames(Ping(1)))
    assert str(waited(p)) == (f"rendezvous {RDV} sent no fire instruction within "
                              f"{NET + FIRE_GRACE:g} s")


# -- attempts: retries and budgets ------------------------------------------------------------

TIMEOUT = PunchTimeout("no", Counter({Failure.SILENT: 2}))


def joined(punch_timeout: float = 30.0, the_fire: Fire | None = None) -> Peer:
    p = Peer("client", punch_timeout=punch_timeout)
    p.start()
    conn = p.connect()
    p.says(conn, reply() + frames(the_fire or fire()))
    return p


def fail_paths(p: Peer) -> None:
    for path in the_paths(p):
        p.feed(p.machine.path_failed(path.path, TIMEOUT, p.now))


def rejoin(p: Peer, the_fire: Fire | None = None) -> None:
    """The retry's meeting: a fresh mapping check, then a rejoin hello, then a fire."""
    port = p.probe()
    conn = p.connect()
    [hello] = p.client_frames(conn)
    assert hello == Hello("rejoin", 7, (Endpoint(LOCAL, port),), PUBLIC,
                          hello.punch_timeout, pake=OUR_PAKE,  # type: ignore[union-attr]
                          relay=True, nat=NatSummary())
    p.says(conn, reply() + frames(the_fire or fire()))


def test_a_failed_attempt_is_coordinated_again_and_can_succeed() -> None:
    p = joined()
    p.now = 4.0
    fail_paths(p)
    assert p.said()[-1] == ("punch attempt 1 failed (no connection to the peer within 4 s "
                            f"(tried {PEER} (public)): no SYN from the peer ever arrived: a NAT "
                            "or firewall on the path probably maps each destination to a new "
                            "port (symmetric) or blocks the connection); coordinating again "
                            "with fresh sockets (attempt 2, 26.0 s left)")
    assert p.of(MakePake) == [MakePake("7-orbit-lantern")]  # the same message goes again
    rejoin(p)
    assert p.client_frames(3)[0].punch_timeout == 26.0  # type: ignore[union-attr]
    assert len(p.of(FinishPake)) == 2
    [succeed] = [a for a in p.feed(p.machine.path_opened(2, 5.0)) if isinstance(a, Succeed)]
    assert isinstance(succeed.paired, Paired)
    assert succeed.paired.attempt == 2
    assert succeed.paired.timings.started == 4.0
    assert succeed.paired.timings.probed == 4.0


def test_the_retrys_fire_wait_names_the_peer_that_did_not_come_back() -> None:
    p = joined()
    p.now = 4.0
    fail_paths(p)
    p.probe()
    conn = p.connect()
    p.says(conn, reply())
    assert p.machine.wake_at == 4.0 + min(NET + RETRY_WAIT, 26.0)
    error = waited(p)
    # The meeting's failure is said, the punch's failure is what the session ends with.
    assert isinstance(error, errors.CoordinatedPunchTimeout)
    assert p.said()[-1] == (f"could not coordinate again: rendezvous {RDV} sent no fire "
                            "instruction for a second attempt (the peer did not coordinate "
                            "again) within 17 s")


@pytest.mark.parametrize("reason", ["refusal", "unreachable"])
def test_a_retry_that_cannot_meet_ends_with_the_punch_failure(reason: str) -> None:
    p = joined()
    p.now = 4.0
    fail_paths(p)
    conn = p.last(Connect).conn
    if reason == "unreachable":
        p.feed(p.machine.connect_failed(conn, RendezvousError("gone"), p.now))
    else:
        p.probe()
        conn = p.connect()
        p.says(conn, reply() + frames(ErrorReply("timeout", "the peer did not retry")))
    error = p.failure()
    assert isinstance(error, errors.CoordinatedPunchTimeout)
    assert p.said()[-1].startswith("could not coordinate again: ")


def test_no_retry_when_the_fire_says_it_is_hopeless() -> None:
    hopeless = fire(mapping=("symmetric", "stable"), note="their NAT is symmetric")
    assert hopeless.hopeless
    p = joined(the_fire=hopeless)
    fail_paths(p)
    error = p.failure()
    assert isinstance(error, errors.CoordinatedPunchTimeout)
    assert str(error).endswith("their NAT is symmetric")  # the rendezvous' note is the cause
    assert len(p.of(Connect)) == 1


def test_a_symmetric_nat_facing_no_nat_is_retried() -> None:
    p = joined(the_fire=fire(mapping=("symmetric", "none")))
    fail_paths(p)
    assert not p.of(Fail) and len(p.of(Connect)) == 2


def test_at_most_max_attempts() -> None:
    p = joined(punch_timeout=100.0)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        p.now = attempt * 4.0
        fail_paths(p)
        if attempt < MAX_ATTEMPTS:
            rejoin(p)
    assert isinstance(p.failure(), errors.CoordinatedPunchTimeout)
    assert len([s for s in p.said() if s.startswith("punch attempt")]) == MAX_ATTEMPTS - 1


@pytest.mark.parametrize(("failed_at", "retried"), [(30.0 - MIN_ATTEMPT, True),
                                                     (30.0 - MIN_ATTEMPT + 0.01, False)])
def test_an_attempt_needs_min_attempt_seconds_left(failed_at: float, retried: bool) -> None:
    p = joined(punch_timeout=30.0)
    p.now = failed_at  # the deadline counts from the first fire (at 0)
    fail_paths(p)
    assert bool(p.of(Fail)) != retried


def test_the_first_attempt_gets_half_the_punch_timeout() -> None:
    for punch_timeout, first in ((30.0, 15.0), (5.0, 2.5), (3.0, 3.0)):
        p = Peer("client", punch_timeout=punch_timeout)
        p.start()
        hello = p.client_frames(p.connect())[0]
        assert hello.punch_timeout == first  # type: ignore[union-attr]


def test_refusals_and_rejections_of_punches_name_the_cause() -> None:
    p = joined(the_fire=fire(Stage("lan", PEER_LAN, "arm", 1.0),
                             Stage("public", PEER, "connect", 3.0), mapping=("stable",
                                                                             "symmetric")))
    rejected = PunchTimeout("no", Counter({Failure.REFUSED: 2, Failure.UNREACHABLE: 1}))
    p.feed(p.machine.path_failed(1, rejected, 0.0))
    p.feed(p.machine.path_failed(2, rejected, 0.0))
    error = p.failure()
    assert isinstance(error, errors.CoordinatedPunchTimeout)
    assert error.outcomes == Counter({Failure.REFUSED: 4, Failure.UNREACHABLE: 2})
    assert str(error).startswith(f"no connection to the peer within 4 s (tried {PEER_LAN} "
                                 f"(lan), {PEER} (public)): the peer's NAT rejected our SYNs 6 "
                                 "time(s)")


# -- what comes too late is ignored ------------------------------------------------------------


def test_events_of_connections_and_paths_given_up_change_nothing() -> None:
    p = joined()
    assert p.feed(p.machine.received(1, frames(Ping(1)), 1.0)) == []
    assert p.feed(p.machine.closed(1, None, 1.0)) == []
    assert p.feed(p.machine.path_opened(99, 1.0)) == []
    p.feed(p.machine.path_opened(1, 1.0))
    assert p.feed(p.machine.path_failed(1, TIMEOUT, 2.0)) == []
    assert p.feed(p.machine.timer(1e9)) == []
    assert p.machine.done


# -- the ladder: relay stages ------------------------------------------------------------

RELAY_AT = Endpoint("198.51.100.2", 3012)
RELAY_STAGE = RelayStage(RELAY_AT, 11.0, bytes(range(16)))


def relay_fire(*stages: Stage, mapping: tuple[str, str] | None = ("stable", "symmetric"),
               ) -> Fire:
    return Fire(PUBLIC, PEER, stages, 40.0, "relayed", PEER_PAKE, mapping,  # type: ignore[arg-type]
                relay=RELAY_STAGE)


def vias(p: Peer) -> list[tuple[int, ViaRelay]]:
    return [(a.path, a.how) for a in the_paths(p) if isinstance(a.how, ViaRelay)]


@settings(max_examples=100)
@given(cuts=cut_points, role=st.sampled_from(["server", "client"]))
def test_a_relay_only_plan_goes_to_the_relay_at_once(cuts: list[int], role: PeerRole) -> None:
    if role == "server":
        p = Peer("server", punch_timeout=30.0)
        p.start()
        p.probe()
        conn = p.connect()
        p.says(conn, reply() + frames(Welcome(7, 600.0, PUBLIC), relay_fire()), cuts)
    else:
        p = Peer("client", punch_timeout=30.0)
        p.start()
        conn = p.connect()
        p.says(conn, reply() + frames(Ping(1), relay_fire()), cuts)
    assert not punches(p)
    [(path, via)] = vias(p)
    assert via == ViaRelay("0.0.0.0", RELAY_STAGE)
    assert p.said()[-1] == f"the peer's NAT is symmetric: going through the relay at {RELAY_AT}"
    assert p.of(FinishPake) == [FinishPake(PEER_PAKE)]  # while the relay connection opens
    local = Endpoint(LOCAL, 51234)
    p.now = 0.3
    done = p.feed(p.machine.path_opened(path, p.now, local))
    assert done[0] == Say(f"tunnel up over the relay at {RELAY_AT} (the peer's NAT is "
                          "symmetric)")
    [succeed] = [a for a in done if isinstance(a, Succeed)]
    paired = succeed.paired
    assert isinstance(paired, Paired)
    assert (paired.path, paired.peer, paired.relay, paired.local, paired.why, paired.role) == (
        "relay", PEER, RELAY_AT, local, "the peer's NAT is symmetric", role)
    assert paired.over == f"over the relay at {RELAY_AT}"
    assert paired.peer_pake == PEER_PAKE and p.machine.done


@pytest.mark.parametrize(("mapping", "why"), [
    (("symmetric", "stable"), "our NAT is symmetric"),
    (("symmetric", "symmetric"), "both NATs are symmetric"),
    (("unknown", "symmetric"), "the peer's NAT is symmetric"),
    (None, "the rendezvous planned no direct path"),
])
def test_the_reason_for_the_relay_is_named(mapping: tuple[str, str] | None, why: str) -> None:
    p = joined(the_fire=relay_fire(mapping=mapping))
    [(path, _)] = vias(p)
    [succeed] = [a for a in p.feed(p.machine.path_opened(path, 1.0)) if isinstance(a, Succeed)]
    assert succeed.paired.why == why
    assert succeed.paired.local == Endpoint("0.0.0.0", 0)  # the driver did not say


def test_punch_stages_first_then_the_relay_in_the_same_attempt() -> None:
    p = joined(the_fire=relay_fire(Stage("lan", PEER_LAN, "arm", 1.0),
                                   Stage("public", PEER, "connect", 3.0), mapping=None))
    assert [o.stage.path for o in punches(p)] == ["lan"] and not vias(p)
    p.feed(p.machine.path_failed(1, TIMEOUT, 1.0))
    assert [o.stage.path for o in punches(p)] == ["lan", "public"] and not vias(p)
    p.feed(p.machine.path_failed(2, TIMEOUT, 4.0))
    [(path, via)] = vias(p)
    assert via.stage == RELAY_STAGE
    assert p.said()[-1] == f"no direct path within 4 s: going through the relay at {RELAY_AT}"
    assert len(p.of(Connect)) == 1  # no meeting again
    [succeed] = [a for a in p.feed(p.machine.path_opened(path, 4.2)) if isinstance(a, Succeed)]
    assert isinstance(succeed.paired, Paired)
    assert succeed.paired.path == "relay" and succeed.paired.attempt == 1
    assert succeed.paired.why == "no direct path within 4 s"
    assert len(p.of(FinishPake)) == 1


@pytest.mark.parametrize("error", [
    errors.RelayRefused("relay 198.51.100.2:3012 refused our token: relay token already used"),
    errors.RelayTimeout("the relay at 198.51.100.2:3012 did not join us with the peer within "
                        "11 s: the peer never reached it"),
    RendezvousUnreachable("relay: rendezvous 198.51.100.2:3012: Connection refused"),
])
def test_a_failed_relay_ends_the_attempt_with_its_error_and_no_retry(
        error: NopfError) -> None:
    p = joined(punch_timeout=100.0, the_fire=relay_fire(Stage("public", PEER, "connect", 3.0),
                                                        mapping=None))
    fail_paths(p)  # the punch
    [(path, _)] = vias(p)
    p.feed(p.machine.path_failed(path, error, 15.0))
    assert p.failure() is error
    assert len(p.of(Connect)) == 1 and p.machine.done  # plenty of time left, no retry
    assert p.machine.wake_at is None


def test_a_fire_without_a_relay_stage_is_retried_as_before() -> None:
    p = joined(the_fire=fire(Stage("public", PEER, "connect", 3.0)))
    fail_paths(p)
    assert not vias(p) and not p.of(Fail)
    assert "coordinating again" in p.said()[-1]


# -- the resume meeting, on bytes ----------------------------------------------------------

RID = bytes(range(100, 116))


def resuming(role: PeerRole, direct_only: bool = False, **config: float) -> Peer:
    p = Peer(role, pake=False, **config)
    p.machine = CoordinationMachine(CoordinationConfig(
        role=role, where=RDV, net_timeout=NET, resume=Resume(RID, direct_only),
        **config))  # type: ignore[arg-type]
    p.start()
    return p


@settings(max_examples=100)
@given(cuts=cut_points, role=st.sampled_from(["server", "client"]), direct=st.booleans())
def test_a_resume_meeting_checks_the_mapping_then_says_resume(
        cuts: list[int], role: PeerRole, direct: bool) -> None:
    p = resuming(role, direct, punch_timeout=40.0)
    port = p.probe(cuts=cuts)  # from a fresh port, like a sharer's
    conn = p.connect()
    assert p.last(Connect) == Connect(conn, port, fastopen=True)
    [hello] = p.client_frames(conn)
    assert hello == Hello("resume", None, (Endpoint(LOCAL, port),), PUBLIC, 40.0,
                          resume_id=RID, side="share" if role == "server" else "join",
                          direct_only=direct,  # the whole budget: no retry slot
                          nat=NatSummary())
    assert not p.of(MakePake)
    # The first to arrive waits (pinged) up to RESUME_WAIT for the other.
    p.says(conn, reply() + frames(Ping(1), Ping(2)), cuts)
    assert p.client_frames(conn)[1:] == [Pong(1), Pong(2)]
    assert p.machine.wake_at == RESUME_WAIT + FIRE_GRACE
    p.now = 20.0
    p.says(conn, frames(fire(Stage("public", PEER, "arm", 5.0), mapping=("stable", "stable"))))
    [punch] = punches(p)
    assert punch.local == Endpoint("0.0.0.0", port)
    [succeed] = [a for a in p.feed(p.machine.path_opened(1, 20.1)) if isinstance(a, Succeed)]
    assert succeed.paired == Met(role, PEER, "public", Endpoint("0.0.0.0", port), PUBLIC, 0.04,
                                 Timings(0.0, 0.0, 20.0, 20.1, 0.0, 0.0))


def test_a_resume_with_a_relay_stage_returns_a_relayed_connection() -> None:
    p = resuming("client")
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(relay_fire()))
    [(path, _)] = vias(p)
    [succeed] = [a for a in p.feed(p.machine.path_opened(path, 1.0, Endpoint(LOCAL, 5)))
                 if isinstance(a, Succeed)]
    assert isinstance(succeed.paired, Met)
    assert (succeed.paired.path, succeed.paired.relay) == ("relay", RELAY_AT)


def test_the_resume_waits_are_named() -> None:
    p = resuming("server")
    p.probe()
    conn = p.connect()
    p.says(conn, reply())
    assert str(waited(p)) == (f"rendezvous {RDV} sent no fire instruction (the peer did not "
                              f"resume) within {RESUME_WAIT + FIRE_GRACE:g} s")
    q = resuming("client")
    q.probe()
    conn = q.connect()
    q.says(conn, reply() + frames(ErrorReply("timeout", "the peer did not resume within 30 s")))
    error = q.failure()
    assert isinstance(error, errors.PeerDidNotResume)
    assert str(error) == f"rendezvous {RDV}: the peer did not resume within 30 s"


def test_a_failed_direct_only_resume_is_not_retried() -> None:
    p = resuming("server", True, punch_timeout=60.0)
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(fire(Stage("public", PEER, "arm", 5.0))))
    fail_paths(p)
    assert isinstance(p.failure(), errors.CoordinatedPunchTimeout)
    assert len(p.of(Connect)) == 2  # the probe and the hello: no meeting again


def test_a_resume_has_no_code_and_no_spake2() -> None:
    with pytest.raises(ValueError, match="no code and no SPAKE2"):
        CoordinationConfig(role="client", where=RDV, code=CODE, resume=Resume(RID))
    with pytest.raises(ValueError, match="no code and no SPAKE2"):
        CoordinationConfig(role="server", where=RDV, pake=True, resume=Resume(RID))


RST_NAT = NatSummary("endpoint-independent", "rst", False, (), None, False)
SYMMETRIC_NAT = NatSummary("address-and-port-dependent", "drop", False, None, None, False)


def test_our_nat_report_rides_in_the_hello_and_the_fire_predicts_the_path() -> None:
    p = Peer("client", punch_timeout=30.0, nat=SYMMETRIC_NAT)  # type: ignore[arg-type]
    p.start()
    conn = p.connect()
    [hello] = p.client_frames(conn)
    assert hello.nat == SYMMETRIC_NAT  # type: ignore[union-attr]
    relay = RelayStage(Endpoint("198.51.100.2", 3012), 10.0, b"t" * 16)
    the_fire = Fire(PUBLIC, PEER, (Stage("public", PEER, "connect", 3.0),), 40.0, None,
                    PEER_PAKE, ("unknown", "stable"), relay, RST_NAT)
    p.says(conn, reply() + frames(the_fire))
    [fired] = p.of(Fired)
    assert isinstance(fired, Fired) and fired.number == 1 and fired.fire == the_fire
    # Before the first SYN: the Fired action comes before the first OpenPath.
    assert p.actions.index(fired) < p.actions.index(p.of(OpenPath)[0])
    assert fired.prediction is not None and fired.prediction.path == "relay"
    assert fired.prediction.why.startswith("The joiner's NAT is symmetric")
    # The punch fails, the relay opens: the prediction held, and the result says so.
    p.feed(p.machine.path_failed(1, PunchTimeout("no", Counter()), 3.0))
    [succeed] = [a for a in p.feed(p.machine.path_opened(2, 3.1, Endpoint(LOCAL, 5)))
                 if isinstance(a, Succeed)]
    assert isinstance(succeed.paired, Paired)
    assert succeed.paired.path == "relay" and succeed.paired.prediction == fired.prediction


def test_a_resume_meeting_carries_the_report_but_predicts_nothing() -> None:
    p = Peer("server", pake=False, resume=Resume(bytes(16)),  # type: ignore[arg-type]
             nat=RST_NAT)  # type: ignore[arg-type]
    p.start()
    p.probe()
    conn = p.connect()
    [hello] = p.client_frames(conn)
    assert hello.action == "resume" and hello.nat == RST_NAT  # type: ignore[union-attr]
    p.says(conn, reply() + frames(fire(peer_pake=None)))
    [fired] = p.of(Fired)
    assert isinstance(fired, Fired) and fired.prediction is None
    assert p.machine.prediction is None


# -- a sharer whose rendezvous connection breaks registers its code again ----------------


def waiting_sharer() -> tuple[Peer, int]:
    """A sharer with its code, waiting (its SPAKE2 message sent)."""
    p = Peer("server", punch_timeout=30.0)
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(Welcome(7, 600.0, PUBLIC)))
    assert p.client_frames(conn)[-1] == PakeMessage(OUR_PAKE)
    return p, conn


def test_a_sharer_whose_node_dies_registers_the_same_code_again_and_pairs() -> None:
    p, conn = waiting_sharer()
    p.now = 30.0
    p.closes(conn, "Connection reset by peer")
    assert p.said()[-1] == (f"rendezvous {RDV} broke the connection (Connection reset by "
                            "peer): registering pairing code 7-orbit-lantern again in 1 s")
    assert not p.of(Fail)
    assert p.machine.wake_at == 31.0
    p.at(31.0)
    probe = p.last(Connect)
    assert probe.rotate and not probe.fastopen  # the rendezvous' next address, checked
    port = p.probe()
    again = p.connect()
    hello = p.client_frames(again)[0]
    assert hello == Hello("share", 7, (Endpoint(LOCAL, port),), PUBLIC, 15.0, relay=True,
                          nat=NatSummary(), owner=OWNER)
    p.says(again, reply() + frames(Welcome(7, 570.0, PUBLIC)))
    assert p.said()[-1] == f"pairing code 7-orbit-lantern registered again through rendezvous {RDV}"
    assert p.client_frames(again)[1:] == [PakeMessage(OUR_PAKE)]  # for a joiner elsewhere
    assert p.of(ShowCode) == [ShowCode("7-orbit-lantern")]  # shown once, unchanged
    p.says(again, frames(fire()))
    assert isinstance(p.actions[-1], FinishPake)
    # The code's lifetime still counts from the first registration.
    assert p.machine.wake_at is None


def test_a_sharer_keeps_trying_while_no_rendezvous_answers_then_gives_up() -> None:
    p, conn = waiting_sharer()
    p.closes(conn)
    for i in range(MAX_REREGISTER):
        p.at(p.now + 1.0)
        probe = p.last(Connect)
        assert probe.rotate
        p.feed(p.machine.connect_failed(probe.conn, RendezvousUnreachable(
            f"rendezvous {RDV}: Connection refused"), p.now))
        if i < MAX_REREGISTER - 1:
            assert not p.of(Fail)
    error = p.failure()
    assert isinstance(error, RendezvousProtocolError)  # the first loss, as it was
    assert str(error) == f"rendezvous {RDV} closed the connection unexpectedly"


def test_a_rendezvous_that_lost_the_code_ends_the_wait_saying_both() -> None:
    p, conn = waiting_sharer()
    p.closes(conn)
    p.at(p.now + 1.0)
    p.probe()
    again = p.connect()
    p.says(again, reply() + frames(ErrorReply("unknown_code", "pairing code 7-… is not open "
                                              "here")))
    error = p.failure()
    assert isinstance(error, errors.UnknownCode)
    assert str(error) == (f"rendezvous {RDV} closed the connection unexpectedly; registering "
                          "the code again: pairing code 7-… is not open here")


def test_a_rendezvous_without_owner_secrets_is_asked_again_without() -> None:
    p = Peer("server", punch_timeout=30.0)
    p.start()
    p.probe()
    conn = p.connect()
    p.says(conn, reply() + frames(ErrorReply(
        "bad_request", "rendezvous rejected the hello: hello message has unknown field(s): "
        "owner, hello.owner")))
    assert "does not take owner secrets" in p.said()[-1]
    p.probe(40001)  # from the same port again, as after a lost hello
    again = p.connect()
    first = p.client_frames(again)[0]
    assert isinstance(first, Hello) and first.owner is None
    p.says(again, reply() + frames(Welcome(7, 600.0, PUBLIC)))
    p.closes(again)  # no owner: the loss ends it, as before
    assert isinstance(p.failure(), RendezvousProtocolError)


@pytest.mark.parametrize("role", ["server", "client"])
def test_the_codes_words_never_reach_the_rendezvous(role: PeerRole) -> None:
    """Only the nameplate and the SPAKE2 message (which hides the code) leave for the
    rendezvous: the words stay on the two machines (docs/security.md)."""
    p = Peer(role, punch_timeout=30.0)
    p.start()
    conn = p.connect()
    p.says(conn, reply() + frames(Ping(5)))
    sent = b"".join(p.sent.values())
    assert sent and p.client_frames(conn)
    for word in CODE.words:
        assert word.encode() not in sent and word.encode("utf-16-be") not in sent
    assert str(CODE).encode() not in sent


# -- over IPv6: a host without IPv4 (issue 17) ----------------------------------------------

LOCAL6 = "2001:db8:a::2"
PUBLIC6 = Endpoint(LOCAL6, 40002)  # no NAT: the rendezvous sees our own address
RELAY6 = RelayStage(Endpoint("2001:db8:100::2", 3012), 20.0, bytes(range(16)))


@settings(max_examples=200)
@given(cuts=cut_points, deferred=st.booleans())
def test_over_ipv6_a_sharer_checks_no_mapping_and_reads_the_ipv6_reply(
        cuts: list[int], deferred: bool) -> None:
    p = Peer("server", punch_timeout=30.0)
    p.local = LOCAL6
    p.start()
    first = p.connect()  # the mapping check's connection: up, over IPv6
    assert p.client_frames(first) == []  # no probe: there is no NAT mapping to check
    assert p.actions[-2:] == [Close(first), Connect(first + 1, 0, fastopen=True)]
    conn = p.connect(deferred=deferred)
    assert p.client_frames(conn) == [Hello("share", None, (), None, 15.0, relay=True,
                                           nat=NatSummary(), owner=OWNER)]
    the_fire = Fire(PUBLIC6, PEER, (), 40.0, "relayed", PEER_PAKE, ("unknown", "stable"),
                    relay=RELAY6)
    p.says(conn, encode_reply6(PUBLIC6.host, PUBLIC6.port)
           + frames(Ping(1), Welcome(7, 600.0, PUBLIC6), the_fire), cuts)
    assert p.said()[0] == f"public address {PUBLIC6} (local port 40002)"
    assert not punches(p)
    [(path, via)] = vias(p)
    assert via == ViaRelay("0.0.0.0", RELAY6)  # the driver binds :: for an IPv6 relay
    assert p.said()[-1] == ("we reached the rendezvous over IPv6 only, no IPv4 punch: going "
                            "through the relay at [2001:db8:100::2]:3012")
    prediction = p.machine.prediction
    assert prediction is not None and prediction.rule == "ipv6-only-relayed"
    done = p.feed(p.machine.path_opened(path, 1.0, Endpoint(LOCAL6, 5)))
    [succeed] = [a for a in done if isinstance(a, Succeed)]
    assert (succeed.paired.path, succeed.paired.public) == ("relay", PUBLIC6)


def test_a_plan_with_no_path_for_us_fails_at_once_naming_the_cause() -> None:
    # No IPv4 path, no relay, and our IPv6 met none of the peer's (we offered none).
    p = Peer("client", punch_timeout=30.0)
    p.local = LOCAL6
    p.start()
    conn = p.connect()
    note = "the connector reached the rendezvous over IPv6 only: only IPv6 can connect them"
    p.says(conn, encode_reply6(PUBLIC6.host, PUBLIC6.port) + frames(Fire(
        PUBLIC6, PEER, (), 40.0, note, PEER_PAKE, ("unknown", "stable"),
        peer_candidates=(Candidate("ipv6", Endpoint("2001:db8:b::2", 4)),))))
    assert not the_paths(p)
    error = p.failure()
    assert isinstance(error, errors.CoordinatedPunchTimeout)
    assert str(error) == f"no path to the peer could be tried: {note}"
    assert p.machine.done and p.machine.wake_at is None
