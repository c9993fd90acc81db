"""The rendezvous shared through Redis (``nopf-server --redis``), without sockets to
peers: the Redis book against a real ``redis-server`` on loopback (started here, on a
free port), and two server machines (two nodes) wired to it, each driven like
``server.py`` drives it (its book questions answered by the book, its messages to
the other node pushed to that node's list and popped there)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from secrets import token_bytes
from typing import Any

import pytest

from nopf_web.rendezvous.book import PairingLimits, PeerInfo
from nopf_web.rendezvous.cluster import BadRedisUrl, RedisConfig, SharedNode
from nopf_web.rendezvous.redis_book import RedisBook, owner_hash
from nopf_web.rendezvous.server_machine import (
    AskBook,
    BookAnswer,
    Delivered,
    FromNode,
    PollNode,
    ServerLimits,
    StoreHealth,
    ToNode,
)
from nopf_web.rendezvous.shared import (
    Allocate,
    Allocated,
    Claim,
    Claimed,
    FireAt,
    Grant,
    Listed,
    Meet,
    Reclaim,
    RefuseConn,
    Refused,
    Release,
    Republish,
    SharedFormatError,
    Side,
    Update,
    UpdateResume,
    Waiting,
    decode_message,
    encode_message,
)
from nopf_web.wire.address import Endpoint, parse_ipv4_endpoint
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    MAX_CANDIDATES,
    Candidate,
    ErrorReply,
    Fire,
    Hello,
    Ping,
    Relay,
    Relayed,
    Welcome,
    encode,
)
from tests.redis_server import RedisServer, free_port, require_redis_server

from .server_harness import JOINER_IP, LAN_A, LAN_B, SHARER_IP, Harness, Peer

NODE_A, NODE_B = "a" * 16, "b" * 16
RDV_A, RDV_B = ("198.51.100.2", 3012), ("198.51.100.3", 3012)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer("127.0.0.1", free_port()) as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    import redis.asyncio

    c = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    await c.flushall()
    for node in (NODE_A, NODE_B):
        await c.set(f"nopf:node:{node}", 0, px=60_000)  # both nodes alive
    try:
        yield c
    finally:
        await c.aclose()


def waiting(node: str = NODE_A, conn: int = 1, *, public: str = "203.0.113.2:40001",
            probe: str | None = None, side: Side = "share", relay: bool = True) -> Waiting:
    info = PeerInfo(parse_ipv4_endpoint(public), (LAN_A,),
                    None if probe is None else parse_ipv4_endpoint(probe), 10.0, 0.02)
    return Waiting(node, conn, info, True, b"A" * 33, relay, False,
                   Endpoint(*RDV_A) if relay else None, 0, side)


# -- the codec ------------------------------------------------------------------------------


def test_records_and_messages_survive_their_encoding() -> None:
    w = waiting(probe="203.0.113.2:40009", side="join")
    assert Waiting.from_json(w.to_json()) == w
    for msg in (FireAt(7, b"\x00\x01fire", 0.012), Grant((b"t" * 16, b"u" * 16),
                                                          ("1.2.3.4", "5.6.7.8"), 12.5),
                RefuseConn(3, "bad_request", "replaced")):
        assert decode_message(encode_message(msg)) == msg


NAT_A = NatSummary("endpoint-independent", "drop", True, ("UPnP-IGD", "PCP"), False, False)
NAT_B = NatSummary("endpoint-independent", "rst", None, None, None, True)
CANDS_A = (Candidate("ipv6", Endpoint("2001:db8:a::2", 40001)),
           Candidate("mapped", Endpoint("203.0.113.2", 41000)))
CANDS_B = (Candidate("ipv6", Endpoint("2001:db8:b::2", 50001)),)


def test_a_waiting_record_carries_the_nat_report_and_candidates() -> None:
    w = replace(waiting(), nat=NAT_A, candidates=CANDS_A)
    assert Waiting.from_json(w.to_json()) == w
    empty = replace(waiting(), nat=None, candidates=())  # "knows candidates, has none"
    assert Waiting.from_json(empty.to_json()) == empty
    both = replace(waiting(), relay_other=Endpoint("2001:db8:100::2", 3012))
    assert Waiting.from_json(both.to_json()) == both
    # A record of an older node (neither key) reads as a hello without the fields.
    old = json.loads(waiting().to_json())
    del old["nat"], old["candidates"], old["relay_other"]
    assert Waiting.from_json(json.dumps(old)) == waiting()
    # The largest: a full NAT report and MAX_CANDIDATES IPv6 candidates.
    big = replace(waiting(), nat=NAT_A, candidates=tuple(
        Candidate("ipv6", Endpoint(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{0xff00 + i:x}", 65535))
        for i in range(MAX_CANDIDATES)))
    assert Waiting.from_json(big.to_json()) == big and len(big.to_json()) < 1200
    for key, bad in (("nat", {"mapping": "sideways"}), ("candidates", [{"path": "lan"}]),
                     ("candidates", [{"path": "ipv6", "peer": "10.0.0.1:5"}] * 9)):
        with pytest.raises(SharedFormatError, match=f"unreadable waiting record: "
                           f"waiting.{key}"):
            Waiting.from_json(json.dumps({**old, key: bad}))


def test_redis_urls_are_checked_in_one_line() -> None:
    assert RedisConfig.parse("redis://10.0.0.5:6380/2").where == "redis://10.0.0.5:6380/2"
    ok = RedisConfig.parse("rediss://h", password="p@ss/word")
    assert ok.url == "rediss://:p%40ss%2Fword@h/0" and ok.where == "rediss://h:6379/0"
    assert RedisConfig.parse("redis://:secret@h/1").url == "redis://:secret@h/1"
    assert RedisConfig.from_env(None, {"NOPF_REDIS_URL": "redis://h"}) is not None
    assert RedisConfig.from_env(None, {}) is None
    for bad, says in (("http://h", "scheme"), ("redis://", "names no host"),
                      ("redis://h/x", "database number"), ("redis://h:99999", "not a URL"),
                      ("redis://:pw@h/0?x=1", "no query")):
        with pytest.raises(BadRedisUrl, match=says) as info:
            RedisConfig.parse(bad)
        assert "pw" not in str(info.value) or "***" in str(info.value)


# -- the book, on a real redis-server ------------------------------------------------------


async def test_a_code_is_allocated_claimed_once_and_then_told_used(client: Any) -> None:
    book = RedisBook(client)
    got = await book.run(Allocate(waiting(), owner_hash(b"o" * 16), 600.0))
    assert isinstance(got, Allocated) and 1 <= got.nameplate <= 9  # short while quiet
    assert got.expires_in == 600.0
    claim = Claim(got.nameplate, JOINER_IP, False, True)
    first = await book.run(claim)
    assert isinstance(first, Claimed) and first.waiting == waiting()
    second = await book.run(claim)
    assert second == Refused("used", f"pairing code {got.nameplate}-… was already used (codes "
                             "work once): ask for a new code")
    assert 0 < await client.pttl(f"nopf:tomb:{got.nameplate}") <= 600_000


async def test_the_nat_report_and_candidates_come_back_with_the_claim(client: Any) -> None:
    book = RedisBook(client)
    w = replace(waiting(), nat=NAT_A, candidates=CANDS_A)
    got = await book.run(Allocate(w, "", 600.0))
    assert isinstance(got, Allocated)
    claimed = await book.run(Claim(got.nameplate, JOINER_IP, False, True))
    assert isinstance(claimed, Claimed) and claimed.waiting == w
    rid = bytes(range(16))
    await book.run(Meet(rid, replace(w, side="join")))
    met = await book.run(Meet(rid, waiting(NODE_B, 2)))
    assert isinstance(met, Claimed) and (met.waiting.nat, met.waiting.candidates) == (
        NAT_A, CANDS_A)


async def test_nameplates_drawn_from_one_seed_stay_short_distinct_and_varied(
        client: Any) -> None:
    book = RedisBook(client)
    got = [await book.run(Allocate(waiting(NODE_A, i), "", 600.0)) for i in range(40)]
    plates = [a.nameplate for a in got if isinstance(a, Allocated)]
    assert len(set(plates)) == 40 and max(plates) <= 99  # 2 digits while 40 are open
    firsts = set()
    for _ in range(20):  # a quiet rendezvous: the first code is any of 1-9
        await client.flushall()
        await client.set(f"nopf:node:{NODE_A}", 0, px=60_000)
        first = await book.run(Allocate(waiting(), "", 600.0))
        assert isinstance(first, Allocated)
        firsts.add(first.nameplate)
    assert len(firsts) >= 4 and firsts <= set(range(1, 10))


async def test_failed_claims_are_limited_per_source_across_nodes(client: Any) -> None:
    book = RedisBook(client, PairingLimits(max_failed_claims=3))
    for _ in range(3):
        assert (await book.run(Claim(5, JOINER_IP, False, True))).code == "unknown_code"  # type: ignore[union-attr]
    refused = await book.run(Claim(5, JOINER_IP, False, True))
    assert isinstance(refused, Refused) and refused.code == "too_many_guesses"
    assert refused.message.startswith(f"too many failed pairing attempts from {JOINER_IP} (3 "
                                      "within 10 min): wait 10 min")
    other = await book.run(Claim(5, "192.0.2.9", False, True))
    assert isinstance(other, Refused) and other.code == "unknown_code"  # another source
    assert 0 < await client.pttl(f"nopf:fail:{JOINER_IP}") <= 600_000  # it expires


async def test_a_sharer_of_a_dead_node_keeps_its_code_and_registers_it_again(
        client: Any) -> None:
    book = RedisBook(client)
    owner = owner_hash(b"o" * 16)
    got = await book.run(Allocate(waiting(NODE_A, 1), owner, 600.0))
    assert isinstance(got, Allocated)
    await client.delete(f"nopf:node:{NODE_A}")  # node A died (its heartbeat expired)
    gone = await book.run(Claim(got.nameplate, JOINER_IP, False, True))
    assert gone == Refused("busy", f"the sharer of pairing code {got.nameplate}-… is "
                           "reconnecting (its rendezvous node went away): try again in a "
                           "few seconds")
    thief = await book.run(Reclaim(got.nameplate, waiting(NODE_B, 9), owner_hash(b"x" * 16)))
    assert isinstance(thief, Refused) and thief.code == "unknown_code"
    again = await book.run(Reclaim(got.nameplate, waiting(NODE_B, 2), owner))
    assert isinstance(again, Allocated) and again.replaced == (NODE_A, 1)
    assert 590 < again.expires_in <= 600  # the code's lifetime goes on
    claimed = await book.run(Claim(got.nameplate, JOINER_IP, False, True))
    assert isinstance(claimed, Claimed) and (claimed.waiting.node, claimed.waiting.conn) == (
        NODE_B, 2)


async def test_release_and_expiry_leave_tombstones_only_for_their_owner(client: Any) -> None:
    book = RedisBook(client)
    got = await book.run(Allocate(waiting(NODE_A, 1), "", 600.0))
    assert isinstance(got, Allocated)
    await book.run(Release(got.nameplate, NODE_A, 99, "left"))  # not its connection
    assert await client.exists(f"nopf:np:{got.nameplate}")
    await book.run(Release(got.nameplate, NODE_A, 1, "expired"))
    told = await book.run(Claim(got.nameplate, JOINER_IP, False, True))
    assert isinstance(told, Refused) and told.code == "expired"
    no_owner = await book.run(Reclaim(got.nameplate, waiting(), ""))
    assert isinstance(no_owner, Refused) and no_owner.code == "expired"


async def test_a_symmetric_sharer_asks_the_joiner_for_its_mapping_first(client: Any) -> None:
    book = RedisBook(client)
    sym = waiting(probe="203.0.113.2:40777")  # a different port from the same local one
    got = await book.run(Allocate(sym, "", 600.0))
    assert isinstance(got, Allocated)
    no_relay = await book.run(Claim(got.nameplate, JOINER_IP, True, False))
    assert isinstance(no_relay, Refused) and no_relay.code == "probe_required"
    assert isinstance(await book.run(Claim(got.nameplate, JOINER_IP, True, True)), Claimed)


async def test_updates_touch_only_the_owners_record_and_keep_its_expiry(client: Any) -> None:
    book = RedisBook(client)
    got = await book.run(Allocate(waiting(), "", 600.0))
    assert isinstance(got, Allocated)
    newer = replace(waiting(), pake=b"B" * 33)
    await book.run(Update(got.nameplate, newer))
    await book.run(Update(got.nameplate, waiting(NODE_B, 5)))  # not the owner: ignored
    claimed = await book.run(Claim(got.nameplate, JOINER_IP, False, True))
    assert isinstance(claimed, Claimed) and claimed.waiting.pake == b"B" * 33


async def test_a_resume_hellos_update_touches_only_its_record_and_keeps_its_expiry(
        client: Any) -> None:
    book = RedisBook(client)
    rid = bytes(range(16))
    key = f"nopf:resume:{rid.hex()}"
    assert await book.run(Meet(rid, waiting(NODE_A, 1, side="share"))) == Listed()
    ttl = await client.pttl(key)
    newer = replace(waiting(NODE_A, 1, side="share"), relay_other=Endpoint("2001:db8::a", 3012))
    await book.run(UpdateResume(rid, newer))
    await book.run(UpdateResume(rid, waiting(NODE_B, 5, side="share")))  # not its: ignored
    assert 0 < await client.pttl(key) <= ttl
    paired = await book.run(Meet(rid, waiting(NODE_B, 2, side="join")))
    assert isinstance(paired, Claimed) and paired.waiting == newer
    await book.run(UpdateResume(rid, newer))  # paired (gone): nothing is listed again
    assert not await client.exists(key)


async def test_resume_hellos_pair_across_nodes_and_a_newer_one_replaces(client: Any) -> None:
    book = RedisBook(client)
    rid = bytes(range(16))
    assert await book.run(Meet(rid, waiting(NODE_A, 1, side="share"))) == Listed()
    replaced = await book.run(Meet(rid, waiting(NODE_B, 2, side="share")))
    assert replaced == Listed((NODE_A, 1))
    paired = await book.run(Meet(rid, waiting(NODE_A, 3, side="join")))
    assert isinstance(paired, Claimed) and (paired.waiting.node, paired.waiting.conn) == (
        NODE_B, 2)
    assert not await client.exists(f"nopf:resume:{rid.hex()}")


async def test_a_resume_hello_left_by_a_dead_node_is_never_its_partner(client: Any) -> None:
    """A node SIGKILLed with a resume hello listed: once its liveness key expired, a
    hello of the other side on a live node waits (listed) instead of pairing with a
    peer nobody holds, and its partner, back through the live node, pairs with it."""
    book = RedisBook(client)
    rid = bytes(range(16))
    assert await book.run(Meet(rid, waiting(NODE_A, 1, side="share"))) == Listed()
    await client.delete(f"nopf:node:{NODE_A}")  # node A died (its heartbeat expired)
    assert await book.run(Meet(rid, waiting(NODE_B, 2, side="join"))) == Listed()
    paired = await book.run(Meet(rid, waiting(NODE_B, 3, side="share")))
    assert isinstance(paired, Claimed) and (paired.waiting.node, paired.waiting.conn) == (
        NODE_B, 2)


async def test_republish_lists_again_what_a_restarted_redis_lost(client: Any) -> None:
    book = RedisBook(client)
    owner = owner_hash(b"o" * 16)
    rid = bytes(16)
    await book.run(Republish(((42, waiting(NODE_A, 1), 300.0, owner),),
                             ((rid, waiting(NODE_A, 2, side="join"), 20.0),)))
    assert 299_000 < await client.pttl("nopf:np:42") <= 300_000
    again = await book.run(Reclaim(42, waiting(NODE_B, 7), owner))  # its owner still works
    assert isinstance(again, Allocated)
    paired = await book.run(Meet(rid, waiting(NODE_B, 8, side="share")))
    assert isinstance(paired, Claimed)


async def test_messages_wait_in_a_nodes_list_until_it_takes_them(client: Any) -> None:
    book = RedisBook(client)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(book.wake_channel(NODE_B))
    await book.deliver(NODE_B, FireAt(3, b"fire", 0.01))
    await book.deliver(NODE_B, RefuseConn(4, "bad_request", "replaced"))
    woke = None
    for _ in range(3):  # the first read may be the (ignored) subscription's confirmation
        woke = woke or await pubsub.get_message(timeout=1.0)
    assert woke is not None and woke["channel"] == "nopf:wake:" + NODE_B
    await pubsub.aclose()
    assert await book.take(NODE_B) == [FireAt(3, b"fire", 0.01),
                                       RefuseConn(4, "bad_request", "replaced")]
    assert await book.take(NODE_B) == []
    await book.deliver(NODE_A, Grant((b"t" * 16, b"u" * 16), ("1.1.1.1", "2.2.2.2"), 5.0))
    assert 0 < await client.pttl(f"nopf:inbox:{NODE_A}") <= 60_000  # a dead node's expires


# -- two nodes' machines on one book --------------------------------------------------------


class Cluster:
    """Two nodes (harnesses with node ids) and the Redis book between them, driven as
    ``server.py`` and ``cluster.py`` drive them (answers and messages in order)."""

    def __init__(self, client: Any, limits: ServerLimits | None = None) -> None:
        self.book = RedisBook(client)
        self.nodes = {NODE_A: Harness(limits, node=NODE_A), NODE_B: Harness(limits, node=NODE_B)}
        self.lost_wakeups = False
        self.redis_gone = False  # node messages fail

    def node(self, name: str) -> Harness:
        return self.nodes[name]

    async def up(self) -> None:
        for name, h in self.nodes.items():
            h.feed(StoreHealth(None, h.now))
            await self.book.heartbeat(name, 0)

    async def settle(self) -> None:
        """Carry out every node's shared actions until none is left."""
        busy = True
        while busy:
            busy = False
            for name, h in self.nodes.items():
                actions, h.shared = h.shared, []
                for a in actions:
                    busy = True
                    if isinstance(a, AskBook):
                        result = await self.book.run(a.op)
                        if a.conn is not None:
                            assert result is not None
                            h.feed(BookAnswer(a.conn, result, h.now))
                    elif isinstance(a, ToNode):
                        if self.redis_gone:
                            if a.conn is not None:
                                h.feed(Delivered(a.conn, "Redis at X: gone", h.now))
                            continue
                        await self.book.deliver(a.node, *a.messages)
                        if a.conn is not None:
                            h.feed(Delivered(a.conn, None, h.now))
                        if not self.lost_wakeups:
                            await self.take(a.node)
                    else:
                        assert isinstance(a, PollNode)
                        await self.take(name)

    async def take(self, name: str) -> None:
        h = self.nodes[name]
        for msg in await self.book.take(name):
            h.feed(FromNode(msg, h.now))

    def tick(self, seconds: float) -> None:
        for h in self.nodes.values():
            h.advance(seconds)


async def share_on(c: Cluster, name: str, **hello: Any) -> tuple[Peer, int]:
    h = c.node(name)
    peer = h.hello(Hello("share", None, (LAN_A,), None, 10, relay=True, **hello), SHARER_IP)
    await c.settle()
    welcome = peer.messages()[0]
    assert isinstance(welcome, Welcome), peer.messages()
    return peer, welcome.nameplate


async def join_on(c: Cluster, name: str, nameplate: int, **hello: Any) -> Peer:
    h = c.node(name)
    peer = h.hello(Hello("join", nameplate, (LAN_B,), None, 10, relay=True, **hello),
                   JOINER_IP, rtt=0.06)
    await c.settle()
    return peer


async def test_a_sharer_on_one_node_and_a_joiner_on_another_pair_as_on_one(
        client: Any) -> None:
    c = Cluster(client)
    await c.up()
    sharer, nameplate = await share_on(c, NODE_A, pake=None)
    joiner = await join_on(c, NODE_B, nameplate)
    to_joiner = joiner.last()
    assert isinstance(to_joiner, Fire), joiner.messages()
    assert to_joiner.peer_public.host == SHARER_IP and to_joiner.public.host == JOINER_IP
    a, b = c.node(NODE_A), c.node(NODE_B)
    assert not any(isinstance(m, Fire) for m in sharer.messages())  # due a little later
    a.advance(0.05)
    to_sharer = sharer.last()
    assert isinstance(to_sharer, Fire)
    assert to_sharer.peer_public.host == JOINER_IP
    assert to_sharer.rtt_ms == to_joiner.rtt_ms
    # Fired (joiner's RTT 60 ms, sharer's 20 ms): (60 - 20) / 2 + 5 ms after the joiner's.
    joined_at = joiner.sent_at[-1][0]
    fired_at = sharer.sent_at[-1][0]
    assert fired_at - joined_at == pytest.approx(0.025, abs=0.001)
    assert (a.m.stats.paired, b.m.stats.paired) == (0, 1)  # the joiner's node planned
    # The relay stage: the same session's two tokens, served by one node.
    assert to_sharer.relay is not None and to_joiner.relay is not None
    assert to_sharer.relay.relay == to_joiner.relay.relay
    serving = a if to_sharer.relay.token in a.m.tickets else b
    assert {to_sharer.relay.token, to_joiner.relay.token} <= set(serving.m.tickets)


async def test_a_pair_across_nodes_gets_the_nat_reports_and_candidates_as_on_one_node(
        client: Any) -> None:
    """The sharer's NAT report and candidates wait in the shared book with it: the
    joiner on the other node gets them in its fire (and the sharer the joiner's), and
    the pairing predicts the same path, exactly as when both are on one node."""
    def stages(fire: Fire) -> list[tuple[str, str | None, float]]:
        return [(st.path, st.punch, st.budget) for st in fire.plan]

    got = {}
    for share_node, join_node in ((NODE_A, NODE_A), (NODE_A, NODE_B)):
        c = Cluster(client)
        await c.up()
        sharer, nameplate = await share_on(c, share_node, nat=NAT_A, candidates=CANDS_A)
        joiner = await join_on(c, join_node, nameplate, nat=NAT_B, candidates=CANDS_B)
        c.tick(0.05)
        to_sharer, to_joiner = sharer.last(), joiner.last()
        assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire)
        predicted = {**c.node(NODE_A).m.stats.predicted}
        for path, n in c.node(NODE_B).m.stats.predicted.items():
            predicted[path] = predicted.get(path, 0) + n
        got[join_node] = (to_sharer.peer_nat, to_sharer.peer_candidates, to_joiner.peer_nat,
                          to_joiner.peer_candidates, stages(to_sharer), stages(to_joiner),
                          predicted)
        await client.flushall()
    assert got[NODE_A][:4] == (NAT_B, CANDS_B, NAT_A, CANDS_A)
    assert got[NODE_B] == got[NODE_A]  # across nodes as on one
    assert sum(got[NODE_B][-1].values()) == 1


async def test_the_relay_runs_on_the_node_that_paired_or_the_other_and_spreads(
        client: Any) -> None:
    served = set()
    for round_ in range(6):
        c = Cluster(client)
        # Both nodes idle (a tie): the pairing node flips a coin; here, each way in turn.
        def coin(n: int, r: int = round_) -> bytes:
            return bytes([r]) if n == 1 else token_bytes(n)

        c.nodes[NODE_B].m._entropy = coin
        await c.up()
        sharer, nameplate = await share_on(c, NODE_A)
        joiner = await join_on(c, NODE_B, nameplate)
        c.tick(0.05)
        to_sharer, to_joiner = sharer.last(), joiner.last()
        assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire)
        assert to_sharer.relay is not None and to_joiner.relay is not None
        where = NODE_A if to_sharer.relay.token in c.node(NODE_A).m.tickets else NODE_B
        assert to_joiner.relay.relay == Endpoint(*RDV_A) or where == NODE_B
        # Both sides present their tokens at that node: relayed.
        h = c.node(where)
        s = h.connect(SHARER_IP, local=RDV_A)
        j = h.connect(JOINER_IP, local=RDV_A)
        h.send(s, encode(Relay(to_sharer.relay.token)))
        h.send(j, encode(Relay(to_joiner.relay.token)))
        assert h.relays and s.messages() == [Relayed()] == j.messages()
        served.add(where)
        await client.flushall()
    assert served == {NODE_A, NODE_B}


# Each node's own addresses, one per family (as nopf-server bound them).
NODE_ADDRS = {NODE_A: {False: RDV_A, True: ("2001:db8:100::2", 3012)},
              NODE_B: {False: RDV_B, True: ("2001:db8:100::3", 3012)}}
RID = bytes(range(16))  # the resume id of the tests that meet again
PEER_IPS = {("share", False): SHARER_IP, ("share", True): "2001:db8:a::2",
            ("join", False): JOINER_IP, ("join", True): "2001:db8:b::2"}


def share_hello(resume: bool) -> Hello:
    """A sharer's hello, or (``resume``) the share side's resume hello."""
    if resume:
        return Hello("resume", None, (LAN_A,), None, 10, resume_id=RID, side="share")
    return Hello("share", None, (LAN_A,), None, 10, relay=True)


def join_hello(resume: bool, first: object) -> Hello:
    """The other side's hello, given the sharer's first answer: a ping (a resume hello
    waits for its other side), else the welcome with the code."""
    if resume:
        assert isinstance(first, Ping), first
        return Hello("resume", None, (LAN_B,), None, 10, resume_id=RID, side="join")
    assert isinstance(first, Welcome), first
    return Hello("join", first.nameplate, (LAN_B,), None, 10, relay=True)


async def pair_families(c: Cluster, share_node: str, join_node: str, s6: bool, j6: bool,
                        *, resume: bool = False) -> tuple[Peer, Peer]:
    """A sharer (over IPv6 if ``s6``) on one node, a joiner (``j6``) on one node, each
    reaching its node at that node's address of its family; both fires. ``resume``:
    the two meet again by a resume id (a tunnel's lost path), not by a code."""
    a, b = c.node(share_node), c.node(join_node)
    sharer = a.connect(PEER_IPS["share", s6], local=NODE_ADDRS[share_node][s6])
    a.send(sharer, encode(share_hello(resume)))
    await c.settle()
    hello = join_hello(resume, sharer.messages()[0])
    joiner = b.connect(PEER_IPS["join", j6], local=NODE_ADDRS[join_node][j6], rtt=0.06)
    b.send(joiner, encode(hello))
    await c.settle()
    c.tick(0.05)
    return sharer, joiner


@pytest.mark.parametrize("resume", [False, True], ids=["code", "resume"])
async def test_a_pair_split_across_nodes_and_families_relays_each_side_in_its_own_family(
        client: Any, resume: bool) -> None:
    """Every mix of IPv4 and IPv6 peers, on one node or two, the relay here or there,
    paired by a code or meeting again by a resume id: each side's relay stage is the
    relay node's address in that side's own family, both sides' on one node, and there
    both tokens get the pair relayed."""
    seen = set()
    nodes = ((NODE_A, NODE_A), (NODE_A, NODE_B), (NODE_B, NODE_A))
    both = (False, True)
    for (share_node, join_node), s6, j6, flip in itertools.product(nodes, both, both, (0, 1)):
        c = Cluster(client)
        def coin(n: int, f: int = flip) -> bytes:  # here (1) or there (0)
            return bytes([f]) if n == 1 else token_bytes(n)

        for name, h in c.nodes.items():
            h.m.listening(NODE_ADDRS[name].values())
            h.m._entropy = coin
        await c.up()
        sharer, joiner = await pair_families(c, share_node, join_node, s6, j6, resume=resume)
        to_sharer, to_joiner = sharer.last(), joiner.last()
        case = (share_node, join_node, s6, j6, flip)
        assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire), case
        assert to_sharer.relay is not None and to_joiner.relay is not None, case
        where = (NODE_A if to_sharer.relay.token in c.node(NODE_A).m.tickets
                 else NODE_B)
        assert to_joiner.relay.token in c.node(where).m.tickets, case
        addrs = NODE_ADDRS[where]
        assert to_sharer.relay.relay == Endpoint(*addrs[s6]), case
        assert to_joiner.relay.relay == Endpoint(*addrs[j6]), case
        h = c.node(where)
        s = h.connect(PEER_IPS["share", s6], local=addrs[s6])
        j = h.connect(PEER_IPS["join", j6], local=addrs[j6])
        h.send(s, encode(Relay(to_sharer.relay.token)))
        h.send(j, encode(Relay(to_joiner.relay.token)))
        assert h.relays and s.messages() == [Relayed()] == j.messages(), case
        seen.add((share_node == join_node, s6, j6, where == join_node))
        await client.flushall()
    # Across nodes, every mix was relayed by the joiner's node and by the sharer's.
    assert {x for x in seen if not x[0]} == {
        (False, s6, j6, here) for s6, j6, here in itertools.product(both, both, both)}


async def test_only_a_node_with_both_families_relays_a_split_pair_or_the_pair_is_refused(
        client: Any) -> None:
    """An IPv6 sharer on node A, an IPv4 joiner on node B: a node that knows no relay
    address in one of the families cannot relay for them. The other does, whatever the
    loads; if neither knows both, the pair is refused in one line that says why."""
    for knows_a, knows_b, where in (((False, True), (False,), NODE_A),
                                    ((True,), (False, True), NODE_B),
                                    ((True,), (False,), None)):
        c = Cluster(client)
        c.node(NODE_A).m.listening(NODE_ADDRS[NODE_A][f] for f in knows_a)
        c.node(NODE_B).m.listening(NODE_ADDRS[NODE_B][f] for f in knows_b)
        if where is not None:
            c.node(where).m._relay_count = 5  # busier: the other node, if it could
        await c.up()
        sharer, joiner = await pair_families(c, NODE_A, NODE_B, True, False)
        to_sharer, to_joiner = sharer.last(), joiner.last()
        if where is None:
            assert isinstance(to_sharer, ErrorReply) and to_sharer == to_joiner
            assert to_joiner.code == "symmetric_nat" and "\n" not in to_joiner.message
            assert to_joiner.message.endswith(
                "no relay is planned; neither node of this pair has a relay address in IPv4 "
                "and IPv6"), to_joiner.message
        else:
            assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire)
            assert to_sharer.relay is not None and to_joiner.relay is not None
            assert to_sharer.relay.token in c.node(where).m.tickets
            assert to_sharer.relay.relay == Endpoint(*NODE_ADDRS[where][True])
            assert to_joiner.relay.relay == Endpoint(*NODE_ADDRS[where][False])
        await client.flushall()


async def test_a_node_bound_to_wildcards_knows_a_family_from_the_last_peer_of_it(
        client: Any) -> None:
    """Listening on 0.0.0.0 and :: says nothing: a node learns its address in a family
    from the peers that reached it in that family (then publishes it for the other),
    never from a loopback or link-local one (no peer elsewhere could use it)."""
    c = Cluster(client)
    for h in c.nodes.values():
        h.m.listening([("0.0.0.0", 3012), ("::", 3012)])
        h.connect("127.0.0.1", local=("127.0.0.1", 3012))
        h.connect("fe80::1", local=("fe80::2", 3012))
    await c.up()
    sharer, joiner = await pair_families(c, NODE_A, NODE_B, True, False)
    assert isinstance(joiner.last(), ErrorReply)  # neither knew both families yet
    await client.flushall()
    await c.up()
    c.node(NODE_A).connect(JOINER_IP, local=RDV_A)  # node A: reached over IPv4 once
    sharer, joiner = await pair_families(c, NODE_A, NODE_B, True, False)
    to_sharer, to_joiner = sharer.last(), joiner.last()
    assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire)
    assert to_sharer.relay is not None and to_joiner.relay is not None
    assert (to_sharer.relay.relay, to_joiner.relay.relay) == (
        Endpoint(*NODE_ADDRS[NODE_A][True]), Endpoint(*RDV_A))


@pytest.mark.parametrize("resume", [False, True], ids=["code", "resume"])
async def test_a_family_learned_after_a_peer_was_listed_reaches_its_record(
        client: Any, resume: bool) -> None:
    """Node A learns its IPv4 address from a peer only after an IPv6 sharer's record (or
    a resume hello's) was listed: it lists the record again with that address, so an
    IPv4 joiner on node B (which knows no IPv6 address of its own) is relayed at node A."""
    c = Cluster(client)
    for h in c.nodes.values():
        h.m.listening([("0.0.0.0", 3012), ("::", 3012)])
    await c.up()
    a, b = c.node(NODE_A), c.node(NODE_B)
    sharer = a.connect(PEER_IPS["share", True], local=NODE_ADDRS[NODE_A][True])
    a.send(sharer, encode(share_hello(resume)))
    await c.settle()
    hello = join_hello(resume, sharer.messages()[0])
    a.connect(JOINER_IP, local=RDV_A)  # node A: reached over IPv4, after the listing
    await c.settle()
    joiner = b.connect(JOINER_IP, local=RDV_B, rtt=0.06)
    b.send(joiner, encode(hello))
    await c.settle()
    c.tick(0.05)
    to_sharer, to_joiner = sharer.last(), joiner.last()
    assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire), to_joiner
    assert to_sharer.relay is not None and to_joiner.relay is not None
    assert (to_sharer.relay.relay, to_joiner.relay.relay) == (
        Endpoint(*NODE_ADDRS[NODE_A][True]), Endpoint(*RDV_A))


async def test_a_relay_token_that_arrives_before_its_grant_waits_for_it(client: Any) -> None:
    c = Cluster(client)
    c.lost_wakeups = True  # the grant sits in node A's list: nobody woke it
    c.nodes[NODE_B].m._relay_count = 5  # busier: the relay goes to node A
    await c.up()
    sharer, nameplate = await share_on(c, NODE_A)
    joiner = await join_on(c, NODE_B, nameplate)
    to_joiner = joiner.last()
    assert isinstance(to_joiner, Fire) and to_joiner.relay is not None
    a = c.node(NODE_A)
    assert to_joiner.relay.token not in a.m.tickets
    early = a.connect(JOINER_IP, local=RDV_A)
    a.send(early, encode(Relay(to_joiner.relay.token)))
    assert early.messages() == []  # held, not refused
    await c.settle()  # the hold polled the list: the grant (and the sharer's fire) arrive
    assert to_joiner.relay.token in a.m.tickets
    c.tick(0.05)
    to_sharer = sharer.last()
    assert isinstance(to_sharer, Fire) and to_sharer.relay is not None
    s = a.connect(SHARER_IP, local=RDV_A)
    a.send(s, encode(Relay(to_sharer.relay.token)))
    assert early.messages() == [Relayed()] == s.messages()


async def test_an_unknown_token_is_refused_after_the_grant_wait(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    a = c.node(NODE_A)
    stray = a.connect(JOINER_IP, local=RDV_A)
    a.send(stray, encode(Relay(b"z" * 16)))
    await c.settle()
    a.advance(2.0)
    err = stray.last()
    assert isinstance(err, ErrorReply) and err.message == "relay refused: unknown relay token"


async def test_resume_hellos_on_two_nodes_meet(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    rid = bytes(range(16))
    first = c.node(NODE_A).hello(Hello("resume", None, (LAN_A,), None, 10, resume_id=rid,
                                       side="share"), SHARER_IP)
    await c.settle()
    assert isinstance(first.messages()[0], Ping)  # waiting, pinged
    second = c.node(NODE_B).hello(Hello("resume", None, (LAN_B,), None, 10, resume_id=rid,
                                        side="join"), JOINER_IP, rtt=0.06)
    await c.settle()
    c.tick(0.05)
    assert isinstance(first.last(), Fire) and isinstance(second.last(), Fire)
    assert c.node(NODE_B).m.stats.resumed == 1


async def test_without_redis_new_pairings_are_refused_with_the_reason_then_resume(
        client: Any) -> None:
    c = Cluster(client)
    await c.up()
    a = c.node(NODE_A)
    sharer, nameplate = await share_on(c, NODE_A)
    a.feed(StoreHealth("Redis at redis://127.0.0.1:6379/0: Connection refused", a.now))
    assert [log.line for log in a.logs][-1] == (
        "shared state lost: Redis at redis://127.0.0.1:6379/0: Connection refused: refusing "
        "new pairings until it is back")
    refused = a.hello(Hello("share", None, (LAN_A,), None, 10), SHARER_IP)
    err = refused.last()
    assert isinstance(err, ErrorReply) and err.code == "busy"
    assert err.message == ("the rendezvous cannot pair now: Redis at redis://127.0.0.1:6379/0: "
                           "Connection refused")
    assert isinstance(sharer.last(), Ping)  # the waiting sharer waits on
    await client.flushall()  # Redis restarted without its data
    await c.book.heartbeat(NODE_A, 0)
    a.feed(StoreHealth(None, a.now))
    await c.settle()  # node A lists its waiting sharer again
    joiner = await join_on(c, NODE_B, nameplate)
    assert isinstance(joiner.last(), Fire)


async def test_a_book_that_does_not_answer_costs_a_busy_refusal(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    a = c.node(NODE_A)
    peer = a.hello(Hello("share", None, (LAN_A,), None, 10), SHARER_IP)
    a.shared.clear()  # the question is lost
    a.advance(2.5)
    err = peer.last()
    assert isinstance(err, ErrorReply) and err.code == "busy"
    assert "did not answer within 2 s" in err.message
    # Its late answer (a code allocated to nobody) is given back.
    a.feed(BookAnswer(peer.id, Allocated(5, 600.0), a.now))
    assert [type(x.op) for x in a.shared if isinstance(x, AskBook)] == [Release]


async def test_a_node_that_stops_keeps_its_sharers_codes_for_them(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    _, nameplate = await share_on(c, NODE_A, owner=b"o" * 16)
    from nopf_web.rendezvous.server_machine import Shutdown

    c.node(NODE_A).feed(Shutdown(c.node(NODE_A).now))
    await c.settle()
    assert await client.exists(f"nopf:np:{nameplate}")  # not released: registered again
    again = c.node(NODE_B).hello(Hello("share", nameplate, (LAN_A,), None, 10,
                                       owner=b"o" * 16), SHARER_IP)
    await c.settle()
    welcome = again.messages()[0]
    assert isinstance(welcome, Welcome) and welcome.nameplate == nameplate


async def test_a_newer_registration_of_a_code_ends_the_older_connection(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    old, nameplate = await share_on(c, NODE_A, owner=b"o" * 16)
    c.node(NODE_B).hello(Hello("share", nameplate, (LAN_A,), None, 10, owner=b"o" * 16),
                         SHARER_IP)
    await c.settle()
    err = old.last()
    assert isinstance(err, ErrorReply) and err.message == (
        "this pairing code was registered again through another connection")


def test_one_node_without_redis_refuses_to_register_a_code_again() -> None:
    h = Harness()
    peer = h.hello(Hello("share", 12, (LAN_A,), None, 10, owner=b"o" * 16), SHARER_IP)
    err = peer.last()
    assert isinstance(err, ErrorReply) and err.code == "unknown_code"
    assert "keeps its codes in memory" in err.message


async def test_a_resume_hello_gone_before_its_answer_is_not_left_listed(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    a = c.node(NODE_A)
    rid = bytes(range(16))
    peer = a.hello(Hello("resume", None, (LAN_A,), None, 10, resume_id=rid, side="share"),
                   SHARER_IP)
    a.close(peer)  # its FIN before the book's answer
    await c.settle()  # listed, then unlisted: nobody waits there
    assert not await client.exists(f"nopf:resume:{rid.hex()}")


# -- one node's Redis side (cluster.SharedNode) -----------------------------------------------


async def run_node(url: str, fed: list[Any]) -> tuple[SharedNode, asyncio.Task[None]]:
    node = SharedNode(RedisConfig.parse(url), fed.append, lambda: 0, node=NODE_B)
    return node, asyncio.create_task(node.run(), name="shared-node")


async def until(check: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - a condition of another task's making
            await asyncio.sleep(0.02)


async def test_a_node_acts_once_on_each_message_by_wake_up_or_by_its_list(
        client: Any, redis_server: RedisServer) -> None:
    fed: list[Any] = []
    node, task = await run_node(redis_server.url, fed)
    try:
        await until(lambda: any(isinstance(e, StoreHealth) and e.problem is None for e in fed))
        await asyncio.sleep(0.2)  # subscribed
        book = RedisBook(client)
        await book.deliver(NODE_B, FireAt(3, b"now", 0.0))  # woken at once
        await client.rpush(f"nopf:inbox:{NODE_B}",  # pushed without a wake-up: polled
                           encode_message(FireAt(4, b"later", 0.0)))
        await until(lambda: len([e for e in fed if isinstance(e, FromNode)]) >= 2)
        await asyncio.sleep(1.5)  # a poll of the list: nothing twice
        got = [e.message for e in fed if isinstance(e, FromNode)]
        assert got == [FireAt(3, b"now", 0.0), FireAt(4, b"later", 0.0)]
        node.ask(7, Claim(1, JOINER_IP, False, True))
        await until(lambda: any(isinstance(e, BookAnswer) for e in fed))
        answer = next(e for e in fed if isinstance(e, BookAnswer))
        assert answer.conn == 7 and isinstance(answer.result, Refused)
        assert answer.result.code == "unknown_code"
        assert await client.get(f"nopf:node:{NODE_B}") == "0"  # its heartbeat
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not await client.exists(f"nopf:node:{NODE_B}")  # it left


async def test_a_node_without_redis_says_why_and_answers_busy() -> None:
    require_redis_server()
    fed: list[Any] = []
    port = free_port()  # nothing listens there
    node, task = await run_node(f"redis://127.0.0.1:{port}/0", fed)
    try:
        node.ask(5, Claim(1, JOINER_IP, False, True))
        await until(lambda: any(isinstance(e, BookAnswer) for e in fed))
        health = [e for e in fed if isinstance(e, StoreHealth)]
        assert health and health[0].problem is not None
        assert health[0].problem.startswith(f"Redis at redis://127.0.0.1:{port}/0: ")
        assert "\n" not in health[0].problem
        answer = next(e for e in fed if isinstance(e, BookAnswer))
        assert answer.result == Refused("busy", "the rendezvous cannot pair now: "
                                        f"{health[0].problem}")
        assert len(health) == 1  # said once, not per failure
        with RedisServer("127.0.0.1", port):  # Redis comes
            await until(lambda: any(isinstance(e, StoreHealth) and e.problem is None
                                    for e in fed), timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_bad_redis_url_is_one_line_and_exit_status_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from nopf_web.cli.server import main

    assert main(["--redis", "redis://:hunter2@db.example/x"]) == 2
    err = capsys.readouterr().err
    assert err == ("nopf-server: error: --redis 'redis://:***@db.example/x': the path must be a "
                   "database number (/0, /1...), not /x\n")  # the password never printed
    monkeypatch.setenv("NOPF_REDIS_URL", "memcached://db")
    assert main([]) == 2
    assert "the scheme must be redis:// or rediss://" in capsys.readouterr().err


async def test_a_joiner_is_fired_only_once_its_sharers_node_has_its_fire(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    sharer, nameplate = await share_on(c, NODE_A)
    c.redis_gone = True  # the claim went through; then Redis went away
    joiner = await join_on(c, NODE_B, nameplate)
    err = joiner.last()
    assert isinstance(err, ErrorReply) and err.code == "busy"
    assert err.message == "the rendezvous cannot pair now: Redis at X: gone"
    assert not any(isinstance(m, Fire) for m in sharer.messages())  # it waits on
    # Redis back (emptied): node A lists its sharer again, and the code pairs.
    c.redis_gone = False
    await client.flushall()
    a = c.node(NODE_A)
    await c.book.heartbeat(NODE_A, 0)
    a.feed(StoreHealth("Redis at X: gone", a.now))
    a.feed(StoreHealth(None, a.now))
    await c.settle()
    again = await join_on(c, NODE_B, nameplate)
    assert isinstance(again.last(), Fire)
    c.tick(0.05)
    assert isinstance(sharer.last(), Fire)


async def test_many_waiting_sharers_are_listed_again_in_batches(client: Any) -> None:
    c = Cluster(client)
    await c.up()
    a = c.node(NODE_A)
    peers = [a.hello(Hello("share", None, (LAN_A,), None, 10), f"203.0.{i // 200}.{i % 200 + 1}")
             for i in range(450)]  # from many addresses: under the per-source cap
    await c.settle()
    plates = []
    for peer in peers:
        welcome = peer.messages()[0]
        assert isinstance(welcome, Welcome)
        plates.append(welcome.nameplate)
    await client.flushall()  # Redis restarted empty
    a.feed(StoreHealth("Redis at X: gone", a.now))
    a.feed(StoreHealth(None, a.now))
    ops = [x.op for x in a.shared if isinstance(x, AskBook)]
    assert [len(op.nameplates) for op in ops if isinstance(op, Republish)] == [200, 200, 50]
    await c.settle()
    assert all([await client.exists(f"nopf:np:{n}") for n in plates])
