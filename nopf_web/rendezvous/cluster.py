"""One node of a rendezvous shared through Redis (``nopf-server --redis URL``).

:class:`SharedNode` connects a :class:`~nopf_web.rendezvous.server.RendezvousServer`
(whose machine decides everything) to the :class:`~nopf_web.rendezvous.redis_book.RedisBook`.
It runs as named children of one ``asyncio.TaskGroup``:

- ``redis-book-N``: workers that carry out the machine's :class:`AskBook` and
  :class:`ToNode` actions, each within ``OP_TIMEOUT``, and feed the answers back;
- ``redis-heartbeat``: every ``HEARTBEAT`` s, this node's key (its relay load),
  which also tells whether Redis works: the machine hears :class:`StoreHealth`
  on every change (it refuses new pairings while Redis is away, with the reason,
  and lists its waiting peers again when it is back);
- ``redis-wake``: the pub/sub subscription to this node's channel, subscribed
  again after every loss, with a growing pause: a message published there is
  acted on at once;
- ``redis-inbox``: pops this node's list every ``POLL_INTERVAL`` s (and when a
  relay connection waits for its grant): what the wake-up already brought is
  skipped, what it lost (published while nobody listened) is acted on now. A
  lost wake-up costs at most that second, never a decision.

Redis' errors never leave this module: an operation that fails is answered
``busy`` with the reason (one line), and the node carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .book import PairingLimits
from .redis_book import INBOX_TTL, RedisBook
from .server_machine import BookAnswer, ConnId, Delivered, Event, FromNode, StoreHealth
from .shared import BookOp, NodeId, NodeMessage, Refused, SharedFormatError, decode_message

log = logging.getLogger("nopf.rendezvous")

URL_ENV = "NOPF_REDIS_URL"  # the URL, when not on the command line (keeps a password off ps)
PASSWORD_ENV = "NOPF_REDIS_PASSWORD"  # a password not in the URL (like redis-cli's REDISCLI_AUTH)
OP_TIMEOUT = 1.0  # s for one operation on Redis
HEARTBEAT = 1.0  # s between this node's heartbeats (the key lives NODE_TTL = 3 s)
POLL_INTERVAL = 1.0  # s between reads of this node's messages without a wake-up
WORKERS = 8  # operations in flight at once
RESUBSCRIBE_MAX = 5.0  # s, the longest pause before subscribing again


class BadRedisUrl(ValueError):
    """A ``--redis`` URL that cannot work (one line, naming what is wrong)."""


@dataclass(frozen=True)
class RedisConfig:
    url: str  # with the password, if any: never print it
    where: str  # host:port/db, for messages (no password)

    @classmethod
    def parse(cls, url: str, password: str | None = None) -> RedisConfig:
        """Check ``redis://[user:password@]HOST[:PORT][/DB]`` or ``rediss://`` (TLS);
        ``password`` (from NOPF_REDIS_PASSWORD) goes into the URL if it has none."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port or 6379
        except ValueError as exc:
            raise BadRedisUrl(f"--redis {_safe(url)!r} is not a URL: {exc}") from None
        if parts.scheme not in ("redis", "rediss"):
            raise BadRedisUrl(f"--redis {_safe(url)!r}: the scheme must be redis:// or rediss:// "
                              "(TLS)")
        if not parts.hostname:
            raise BadRedisUrl(f"--redis {_safe(url)!r} names no host")
        db = parts.path.strip("/") or "0"
        if not db.isdigit() or int(db) > 65535:
            raise BadRedisUrl(f"--redis {_safe(url)!r}: the path must be a database number "
                              f"(/0, /1...), not /{db}")
        if parts.query or parts.fragment:
            raise BadRedisUrl(f"--redis {_safe(url)!r}: no query or fragment is understood")
        netloc = parts.netloc
        if password and parts.password is None:
            user = quote(unquote(parts.username or ""), safe="")
            netloc = f"{user}:{quote(password, safe='')}@{netloc.rpartition('@')[2]}"
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        return cls(urlunsplit((parts.scheme, netloc, f"/{db}", "", "")),
                   f"{parts.scheme}://{host}:{port}/{db}")

    @classmethod
    def from_env(cls, url: str | None, env: dict[str, str] | None = None) -> RedisConfig | None:
        env = dict(os.environ) if env is None else env
        url = url or env.get(URL_ENV)
        if not url:
            return None
        return cls.parse(url, env.get(PASSWORD_ENV))


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, f"{parts.username or ''}:***@{host}", parts.path,
                           parts.query, parts.fragment))
    except ValueError:
        return "<unreadable URL>"


def describe_error(exc: BaseException) -> str:
    """One line for a Redis failure."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {OP_TIMEOUT:g} s"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200].rstrip(".")


def new_node_id() -> NodeId:
    return secrets.token_hex(8)


class SharedNode:
    """The Redis side of one node; :meth:`run` until cancelled (see the module doc)."""

    def __init__(self, config: RedisConfig, feed: Callable[[Event], None],
                 load: Callable[[], int], *, node: NodeId | None = None,
                 limits: PairingLimits | None = None, client: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.node = node or new_node_id()
        self._feed = feed
        self._load = load
        self._clock = clock
        if client is None:
            import redis.asyncio  # the optional dependency: only a --redis node needs it

            client = redis.asyncio.from_url(
                config.url, decode_responses=True, socket_timeout=OP_TIMEOUT,
                socket_connect_timeout=OP_TIMEOUT, health_check_interval=10)
        self.client = client
        self.book = RedisBook(client, limits)
        self.problem: str | None = "not connected yet"  # None: Redis answers
        self._said: str | None = None  # the problem the machine was told of
        self._jobs: asyncio.Queue[
            tuple[ConnId | None, BookOp | tuple[NodeId, tuple[NodeMessage, ...]]]] = (
            asyncio.Queue())
        self._poke = asyncio.Event()
        # Messages acted on by one path (pub/sub or the list) and not yet seen by the
        # other, with when: each is acted on once, whichever path brings it first.
        self._seen: dict[str, float] = {}

    # -- the server's driver calls these (from its actions) ----------------------------

    def ask(self, conn: ConnId | None, op: BookOp) -> None:
        self._jobs.put_nowait((conn, op))

    def deliver(self, node: NodeId, messages: tuple[NodeMessage, ...],
                conn: ConnId | None = None) -> None:
        self._jobs.put_nowait((conn, (node, messages)))

    def poll(self) -> None:
        self._poke.set()

    # -- the children ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(WORKERS):
                    tg.create_task(self._worker(), name=f"redis-book-{i}")
                tg.create_task(self._heartbeat(), name="redis-heartbeat")
                tg.create_task(self._inbox(), name="redis-inbox")
                tg.create_task(self._wake(), name="redis-wake")
        finally:
            with contextlib.suppress(Exception):  # best effort: the key expires anyway
                async with asyncio.timeout(OP_TIMEOUT):
                    await self.book.leave(self.node)
            await self.client.aclose()

    def _trouble(self, exc: BaseException) -> str:
        problem = f"Redis at {self.config.where}: {describe_error(exc)}"
        self.problem = problem
        if self._said is None:  # once per outage (the machine starts as not connected)
            self._said = problem
            self._feed(StoreHealth(problem, self._clock()))
        return problem

    def _failed(self, exc: Exception) -> None:
        """A child's failure: Redis away (a state the machine hears of), or a bug of
        ours (one line; the child carries on: the node must not die of it)."""
        if _is_outage(exc):
            self._trouble(exc)
        else:
            log.error("shared state: %s: %s", type(exc).__name__, describe_error(exc))

    async def _worker(self) -> None:
        while True:
            conn, job = await self._jobs.get()
            answer = None
            problem = None
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    if isinstance(job, tuple):
                        await self.book.deliver(job[0], *job[1])
                    else:
                        answer = await self.book.run(job)
            except Exception as exc:  # Redis' errors, OSError, timeouts, a bad record
                problem = self._trouble(exc) if _is_outage(exc) else (
                    f"shared state error: {describe_error(exc)}")
                if conn is None:
                    what = "a message to another node" if isinstance(job, tuple) else (
                        type(job).__name__)
                    log.warning("%s (%s lost)", problem, what)
                answer = Refused("busy", f"the rendezvous cannot pair now: {problem}")
            if conn is None:
                continue
            if isinstance(job, tuple):
                self._feed(Delivered(conn, problem, self._clock()))
            elif answer is not None:
                self._feed(BookAnswer(conn, answer, self._clock()))

    async def _heartbeat(self) -> None:
        while True:
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await self.book.heartbeat(self.node, self._load())
            except Exception as exc:
                self._failed(exc)
            else:
                if self.problem is not None:
                    self.problem = self._said = None
                    self._feed(StoreHealth(None, self._clock()))
                    self._poke.set()  # messages may have waited
            await asyncio.sleep(HEARTBEAT)

    async def _inbox(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL):
                    await self._poke.wait()
            self._poke.clear()
            if self.problem is not None:
                continue
            try:
                while True:
                    async with asyncio.timeout(OP_TIMEOUT):
                        messages = await self.book.take_raw(self.node)
                    for text in messages:
                        self._arrived(text)
                    if len(messages) < 100:
                        break
                self._forget_seen()
            except Exception as exc:
                self._failed(exc)

    def _arrived(self, text: str) -> None:
        """A message, by either path: acted on the first time only."""
        if self._seen.pop(text, None) is not None:
            return  # the other path brought it already
        self._seen[text] = self._clock()
        try:
            message = decode_message(text)
        except SharedFormatError as exc:
            log.error("shared state: %s", exc)
            return
        self._feed(FromNode(message, self._clock()))

    def _forget_seen(self) -> None:
        """Drop what only one path brought long ago (its list entry expired, or its
        wake-up was lost after it was popped)."""
        horizon = self._clock() - 2 * INBOX_TTL
        for text in [t for t, at in self._seen.items() if at < horizon]:
            del self._seen[text]

    async def _wake(self) -> None:
        pause = 0.2
        channel = self.book.wake_channel(self.node)
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await pubsub.subscribe(channel)
                pause = 0.2
                self._poke.set()  # anything pushed while we were not listening
                while True:
                    message = await pubsub.get_message(timeout=POLL_INTERVAL)
                    if message is not None and isinstance(message.get("data"), str):
                        self._arrived(message["data"])
            except Exception as exc:
                self._failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(RESUBSCRIBE_MAX, pause * 2)


def _is_outage(exc: BaseException) -> bool:
    """Redis unreachable, slow or refusing (vs a bug of ours, which must surface)."""
    if isinstance(exc, TimeoutError | OSError | ConnectionError):
        return True
    try:
        import redis
    except ImportError:
        return False
    return isinstance(exc, redis.RedisError)
