"""The shared pairing book in Redis (``nopf-server --redis``): the I/O edge.

Each operation of :mod:`nopf_web.rendezvous.shared` is one Lua script, so it is
atomic across nodes (two joiners on two nodes can never both claim a code) and
costs one round trip. Redis' own clock (``TIME``) times the guess window, so the
nodes' clocks never have to agree. Every key expires: a node that dies leaves
nothing that lives longer than a code's lifetime.

Keys (``P`` is the prefix, ``nopf:`` by default; one Redis primary, not a Redis
Cluster: the scripts touch keys they compute):

    P np:N        hash  rec = Waiting JSON, own = sha256 hex of the sharer's owner
                        secret ("" none), sym = "1" symmetric sharer, rok = "1" its
                        node can relay for it; expires with the code
    P plates      zset  open nameplates, scored by expiry (ms): sizing the space
    P tomb:N      str   "used" | "expired" | "left", for tombstone_lifetime
    P tombs       zset  tombstoned nameplates, scored by expiry (ms)
    P fail:IP     zset  failed claims from IP (score: Redis time, ms), expires after
                        the window
    P seq         str   a counter (unique zset members)
    P resume:HEX  str   Waiting JSON of the first resume hello, for RESUME_WAIT
    P node:ID     str   the node's relay sessions; expires 3 s after its last
                        heartbeat (claims check the sharer's node is alive)
    P inbox:ID    list  NodeMessage JSON for node ID, popped by it; expires 60 s
                        after the last push
    P wake:ID     channel  each message pushed to node ID, published after the push: the
                        node acts on it at once, and skips it when it pops it from
                        its list (which is what counts when the wake-up is lost)
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .book import PairingLimits, describe_duration
from .shared import (
    Allocate,
    Allocated,
    BookOp,
    BookResult,
    Claim,
    Claimed,
    Listed,
    Meet,
    NodeId,
    NodeMessage,
    Reclaim,
    Refused,
    Release,
    Republish,
    SharedFormatError,
    Unlist,
    Update,
    UpdateResume,
    Waiting,
    decode_message,
    encode_message,
)

PREFIX = "nopf:"
NODE_TTL = 3.0  # s a node counts as alive after its last heartbeat
INBOX_TTL = 60.0  # s a node's message list outlives the last push to it
RESUME_TTL = 30.0  # s a waiting resume hello stays listed (RESUME_WAIT)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: prefix, record, owner, lifetime_ms, max_open, sym, rok, seed (1 to M - 1).
# The nameplates tried come from the seed (Park-Miller: x = x * 16807 mod M, M = 2^31 - 1,
# exact in Lua's doubles): one argument instead of 64 drawn and sent by the node, which
# cost it a tenth of its CPU per pairing. Nameplates are not secret: a code's secret is
# its words.
_ALLOCATE = _NOW + """
local p = ARGV[1]
redis.call('ZREMRANGEBYSCORE', p .. 'plates', '-inf', now)
redis.call('ZREMRANGEBYSCORE', p .. 'tombs', '-inf', now)
local open = redis.call('ZCARD', p .. 'plates')
if open >= tonumber(ARGV[5]) then return {'busy', 'many'} end
local taken = open + redis.call('ZCARD', p .. 'tombs')
local space = 9
while space < 2 * (taken + 1) and space < 999999 do space = space * 10 + 9 end
local x = tonumber(ARGV[8])
for _ = 1, 64 do  -- each try finds a free one with odds >= 1/2 (space >= 2 x taken)
  x = (x * 16807) % 2147483647
  local n = tostring(1 + (x % space))
  if redis.call('EXISTS', p .. 'np:' .. n, p .. 'tomb:' .. n) == 0 then
    local k = p .. 'np:' .. n
    redis.call('HSET', k, 'rec', ARGV[2], 'own', ARGV[3], 'sym', ARGV[6], 'rok', ARGV[7])
    redis.call('PEXPIRE', k, ARGV[4])
    redis.call('ZADD', p .. 'plates', now + tonumber(ARGV[4]), n)
    return {'ok', n, ARGV[4]}
  end
end
return {'busy', 'full'}
"""

# ARGV: prefix, nameplate, record, owner, sym, rok
_RECLAIM = """
local p, n = ARGV[1], ARGV[2]
local k = p .. 'np:' .. n
local own = redis.call('HGET', k, 'own')
if not own then
  return {'refused', redis.call('GET', p .. 'tomb:' .. n) or ''}
end
if own == '' or own ~= ARGV[4] then return {'owner'} end
local old = redis.call('HGET', k, 'rec')
redis.call('HSET', k, 'rec', ARGV[3], 'sym', ARGV[5], 'rok', ARGV[6])
return {'ok', n, tostring(redis.call('PTTL', k)), old}
"""

# ARGV: prefix, nameplate, source, window_ms, max_failed, tomb_ms, probe_first, joiner_relays
_CLAIM = _NOW + """
local p, n = ARGV[1], ARGV[2]
local window = tonumber(ARGV[4])
local fk = p .. 'fail:' .. ARGV[3]
redis.call('ZREMRANGEBYSCORE', fk, '-inf', now - window)
local fails = redis.call('ZCARD', fk)
if fails >= tonumber(ARGV[5]) then
  local oldest = redis.call('ZRANGE', fk, 0, 0, 'WITHSCORES')
  return {'guesses', tostring(fails), tostring(tonumber(oldest[2]) + window - now)}
end
local k = p .. 'np:' .. n
local rec = redis.call('HGET', k, 'rec')
if rec then
  local node = cjson.decode(rec)['node']
  if redis.call('EXISTS', p .. 'node:' .. node) == 0 then return {'gone'} end
  if ARGV[7] == '1' and redis.call('HGET', k, 'sym') == '1'
      and not (ARGV[8] == '1' and redis.call('HGET', k, 'rok') == '1') then
    return {'probe'}
  end
  redis.call('DEL', k)
  redis.call('ZREM', p .. 'plates', n)
  redis.call('SET', p .. 'tomb:' .. n, 'used', 'PX', ARGV[6])
  redis.call('ZADD', p .. 'tombs', now + tonumber(ARGV[6]), n)
  return {'ok', rec}
end
redis.call('ZADD', fk, now, tostring(now) .. ':' .. redis.call('INCR', p .. 'seq'))
redis.call('PEXPIRE', fk, window)
return {'refused', redis.call('GET', p .. 'tomb:' .. n) or ''}
"""

# ARGV: prefix, nameplate, node, conn, why, tomb_ms
_RELEASE = _NOW + """
local p, n = ARGV[1], ARGV[2]
local k = p .. 'np:' .. n
local rec = redis.call('HGET', k, 'rec')
if not rec then return 0 end
local w = cjson.decode(rec)
if w['node'] ~= ARGV[3] or tostring(w['conn']) ~= ARGV[4] then return 0 end
redis.call('DEL', k)
redis.call('ZREM', p .. 'plates', n)
redis.call('SET', p .. 'tomb:' .. n, ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', p .. 'tombs', now + tonumber(ARGV[6]), n)
return 1
"""

# ARGV: prefix, nameplate, record, sym, rok, node, conn
_UPDATE = """
local k = ARGV[1] .. 'np:' .. ARGV[2]
local rec = redis.call('HGET', k, 'rec')
if not rec then return 0 end
local w = cjson.decode(rec)
if w['node'] ~= ARGV[6] or tostring(w['conn']) ~= ARGV[7] then return 0 end
redis.call('HSET', k, 'rec', ARGV[3], 'sym', ARGV[4], 'rok', ARGV[5])
return 1
"""

# ARGV: prefix, resume id (hex), record, side, wait_ms
_MEET = """
local p = ARGV[1]
local k = p .. 'resume:' .. ARGV[2]
local rec = redis.call('GET', k)
if rec then
  local w = cjson.decode(rec)
  if redis.call('EXISTS', p .. 'node:' .. w['node']) == 1 then
    if w['side'] ~= ARGV[4] then
      redis.call('DEL', k)
      return {'paired', rec}
    end
    redis.call('SET', k, ARGV[3], 'PX', ARGV[5])
    return {'replaced', rec}
  end
end
redis.call('SET', k, ARGV[3], 'PX', ARGV[5])
return {'listed'}
"""

# ARGV: prefix, resume id (hex), node, conn: returns 0 unless that connection's hello
# is the one listed (a newer hello of its side may have replaced it)
_OWN_RESUME = """
local k = ARGV[1] .. 'resume:' .. ARGV[2]
local rec = redis.call('GET', k)
if not rec then return 0 end
local w = cjson.decode(rec)
if w['node'] ~= ARGV[3] or tostring(w['conn']) ~= ARGV[4] then return 0 end
"""

# ARGV: prefix, resume id (hex), node, conn
_UNLIST = _OWN_RESUME + """
redis.call('DEL', k)
return 1
"""

# ARGV: prefix, resume id (hex), node, conn, record
_UPDATE_RESUME = _OWN_RESUME + """
redis.call('SET', k, ARGV[5], 'KEEPTTL')
return 1
"""

# ARGV: prefix, then per nameplate: n, record, owner, sym, rok, ttl_ms (count in ARGV[2]);
# then per resume: hex id, record, ttl_ms
_REPUBLISH = _NOW + """
local p = ARGV[1]
local plates = tonumber(ARGV[2])
local i = 3
for _ = 1, plates do
  local n, k = ARGV[i], p .. 'np:' .. ARGV[i]
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'rec', ARGV[i + 1], 'own', ARGV[i + 2], 'sym', ARGV[i + 3],
               'rok', ARGV[i + 4])
    redis.call('PEXPIRE', k, ARGV[i + 5])
    redis.call('ZADD', p .. 'plates', now + tonumber(ARGV[i + 5]), n)
  end
  i = i + 6
end
while i <= #ARGV do
  redis.call('SET', p .. 'resume:' .. ARGV[i], ARGV[i + 1], 'PX', ARGV[i + 2], 'NX')
  i = i + 3
end
return 1
"""


# ARGV: prefix, node, list ttl_ms, messages...: pushed to the node's list, then each
# published on its channel (one call: cheaper for the client than a pipeline of three)
_DELIVER = """
local inbox = ARGV[1] .. 'inbox:' .. ARGV[2]
local channel = ARGV[1] .. 'wake:' .. ARGV[2]
for i = 4, #ARGV do redis.call('RPUSH', inbox, ARGV[i]) end
redis.call('PEXPIRE', inbox, ARGV[3])
for i = 4, #ARGV do redis.call('PUBLISH', channel, ARGV[i]) end
return 1
"""


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class _Scripts:
    allocate: Any
    reclaim: Any
    claim: Any
    release: Any
    update: Any
    update_resume: Any
    meet: Any
    unlist: Any
    republish: Any
    deliver: Any


class RedisBook:
    """The shared book's operations on one ``redis.asyncio.Redis`` client (created
    with ``decode_responses=True``). Errors of the client (``redis.RedisError``,
    ``OSError``) pass through: the caller decides what a failure means."""

    def __init__(self, client: Any, limits: PairingLimits | None = None, *,
                 prefix: str = PREFIX) -> None:
        self.client = client
        self.limits = limits or PairingLimits()
        self.prefix = prefix
        reg = client.register_script
        self._s = _Scripts(reg(_ALLOCATE), reg(_RECLAIM), reg(_CLAIM), reg(_RELEASE),
                           reg(_UPDATE), reg(_UPDATE_RESUME), reg(_MEET), reg(_UNLIST),
                           reg(_REPUBLISH), reg(_DELIVER))

    async def run(self, op: BookOp) -> BookResult | None:
        """Carry out ``op``; its answer (None for the operations that have none)."""
        if isinstance(op, Allocate):
            return await self.allocate(op)
        if isinstance(op, Reclaim):
            return await self.reclaim(op)
        if isinstance(op, Claim):
            return await self.claim(op)
        if isinstance(op, Meet):
            return await self.meet(op)
        if isinstance(op, Update):
            await self._s.update(args=[self.prefix, op.nameplate, op.waiting.to_json(),
                                       *self._flags(op.waiting), op.waiting.node,
                                       op.waiting.conn])
        elif isinstance(op, UpdateResume):
            await self._s.update_resume(args=[self.prefix, op.resume_id.hex(),
                                              op.waiting.node, op.waiting.conn,
                                              op.waiting.to_json()])
        elif isinstance(op, Release):
            await self._s.release(args=[self.prefix, op.nameplate, op.node, op.conn, op.why,
                                        _ms(self.limits.tombstone_lifetime)])
        elif isinstance(op, Unlist):
            await self._s.unlist(args=[self.prefix, op.resume_id.hex(), op.node, op.conn])
        else:
            await self.republish(op)
        return None

    @staticmethod
    def _flags(w: Waiting) -> tuple[str, str]:
        return _flag(w.info.mapping == "symmetric"), _flag(w.relay_ok)

    async def allocate(self, op: Allocate) -> BookResult:
        got = await self._s.allocate(args=[
            self.prefix, op.waiting.to_json(), op.owner, _ms(op.lifetime),
            self.limits.max_open_codes, *self._flags(op.waiting),
            1 + secrets.randbelow(2**31 - 2)])
        if got[0] == "ok":
            return Allocated(int(got[1]), int(got[2]) / 1000)
        if got[1] == "many":
            return Refused("busy", "the rendezvous has too many open codes; try again later")
        return Refused("busy", "the rendezvous has no free codes; try again later")

    async def reclaim(self, op: Reclaim) -> BookResult:
        got = await self._s.reclaim(args=[self.prefix, op.nameplate, op.waiting.to_json(),
                                          op.owner, *self._flags(op.waiting)])
        if got[0] == "ok":
            old = Waiting.from_json(got[3])
            mine = (op.waiting.node, op.waiting.conn)
            replaced = None if (old.node, old.conn) == mine else (old.node, old.conn)
            return Allocated(op.nameplate, max(0.0, int(got[2]) / 1000), replaced)
        if got[0] == "owner":
            return Refused("unknown_code", f"pairing code {op.nameplate}-… belongs to another "
                           "sharer: ask for a new code")
        return self._tomb(op.nameplate, got[1])

    async def claim(self, op: Claim) -> BookResult:
        limits = self.limits
        got = await self._s.claim(args=[
            self.prefix, op.nameplate, op.source, _ms(limits.failed_claim_window),
            limits.max_failed_claims, _ms(limits.tombstone_lifetime), _flag(op.probe_first),
            _flag(op.joiner_relays)])
        kind = got[0]
        if kind == "ok":
            return Claimed(Waiting.from_json(got[1]))
        if kind == "gone":
            return Refused("busy", f"the sharer of pairing code {op.nameplate}-… is reconnecting "
                           "(its rendezvous node went away): try again in a few seconds")
        if kind == "probe":
            return Refused("probe_required", "the sharer's NAT is symmetric: check our NAT "
                           "mapping (a probe from the same port), then send the hello again")
        if kind == "guesses":
            return Refused(
                "too_many_guesses",
                f"too many failed pairing attempts from {op.source} ({got[1]} within "
                f"{describe_duration(limits.failed_claim_window)}): wait "
                f"{describe_duration(int(got[2]) / 1000)} and check the code")
        return self._tomb(op.nameplate, got[1])

    def _tomb(self, nameplate: int, why: str) -> Refused:
        """Why a nameplate is not open (the in-memory book's words)."""
        if why == "used":
            return Refused("used", f"pairing code {nameplate}-… was already used (codes work "
                           "once): ask for a new code")
        if why == "expired":
            lifetime = describe_duration(self.limits.code_lifetime)
            return Refused("expired", f"pairing code {nameplate}-… expired (codes last "
                           f"{lifetime}): ask for a new code")
        if why == "left":
            return Refused("unknown_code", f"pairing code {nameplate}-… is no longer open (the "
                           "sharer stopped waiting): ask for a new code")
        return Refused("unknown_code", f"no open pairing code starts with {nameplate} (check "
                       "the number, or ask for a new code)")

    async def meet(self, op: Meet) -> BookResult:
        got = await self._s.meet(args=[self.prefix, op.resume_id.hex(), op.waiting.to_json(),
                                       op.waiting.side, _ms(RESUME_TTL)])
        if got[0] == "paired":
            return Claimed(Waiting.from_json(got[1]))
        if got[0] == "replaced":
            old = Waiting.from_json(got[1])
            return Listed((old.node, old.conn))
        return Listed()

    async def republish(self, op: Republish) -> None:
        args: list[Any] = [self.prefix, len(op.nameplates)]
        for nameplate, waiting, left, owner in op.nameplates:
            args += [nameplate, waiting.to_json(), owner, *self._flags(waiting), _ms(left)]
        for resume_id, waiting, left in op.resumes:
            args += [resume_id.hex(), waiting.to_json(), _ms(left)]
        await self._s.republish(args=args)

    # -- nodes -----------------------------------------------------------------------

    async def heartbeat(self, node: NodeId, load: int) -> None:
        await self.client.set(f"{self.prefix}node:{node}", load, px=int(NODE_TTL * 1000))

    async def leave(self, node: NodeId) -> None:
        await self.client.delete(f"{self.prefix}node:{node}")

    async def deliver(self, node: NodeId, *messages: NodeMessage) -> None:
        """Push to the node's list, then publish each to wake the node (one script,
        one round trip for them all)."""
        await self._s.deliver(args=[self.prefix, node, _ms(INBOX_TTL),
                                    *(encode_message(m) for m in messages)])

    async def take_raw(self, node: NodeId, most: int = 100) -> list[str]:
        """This node's messages as pushed, oldest first (popped: each is taken once)."""
        raw: Sequence[str] | None = await self.client.lpop(f"{self.prefix}inbox:{node}", most)
        return list(raw or ())

    async def take(self, node: NodeId, most: int = 100) -> list[NodeMessage]:
        """This node's messages, decoded (unreadable ones are skipped)."""
        out = []
        for text in await self.take_raw(node, most):
            try:
                out.append(decode_message(text))
            except SharedFormatError:
                continue
        return out

    def wake_channel(self, node: NodeId) -> str:
        return f"{self.prefix}wake:{node}"

    async def waiting_bytes(self, nameplate: int) -> int:
        """Redis' memory for one waiting sharer's key (MEMORY USAGE; benchmarks)."""
        used = await self.client.memory_usage(f"{self.prefix}np:{nameplate}", samples=0)
        return int(used or 0)


def owner_hash(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()
