"""The dashboard's configuration, as the command line (or a test) builds it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from nopf_web.rendezvous.server import DEFAULT_PORT
from nopf_web.wire.address import Endpoint, is_loopback

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
EMBEDDED_LISTEN = Endpoint("127.0.0.1", DEFAULT_PORT)


@dataclass(frozen=True)
class WebConfig:
    db_path: Path
    host: str = "127.0.0.1"
    port: int = 8080
    # None: run the embedded rendezvous on ``rendezvous_listen`` and use it.
    rendezvous: Endpoint | None = None
    rendezvous_listen: Endpoint = EMBEDDED_LISTEN
    guard: bool = True
    punch_timeout: float = 30.0
    # Coordinated sessions ask the gateway for a mapped port (deleted when they stop).
    port_mapping: bool = True
    flush_interval: float = 0.5
    max_live_sessions: int = 32
    # Live session pages (server-sent events): how often a stream compares the values
    # (s), the quiet time before it sends a keepalive comment (s), and how many streams
    # may be open at once (each open session page or share page holds one).
    live_interval: float = 0.5
    live_heartbeat: float = 15.0
    max_live_streams: int = 64
    # Used only in LAN mode (a non-loopback --host): the key printed in the URL.
    access_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @property
    def lan_mode(self) -> bool:
        return not is_loopback(self.host)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Host header names accepted in loopback mode (DNS-rebinding defence)."""
        return LOOPBACK_NAMES | {self.host.lower()}
