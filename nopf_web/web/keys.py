"""Typed keys of what the application and each request carry."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from aiohttp import web

from nopf_web.db import HistoryStore
from nopf_web.doctor.cache import DoctorCache
from nopf_web.guard.base import Guard
from nopf_web.wire.address import Endpoint

from .config import WebConfig
from .manager import SessionManager
from .streams import LiveStreams


@dataclass(frozen=True)
class Access:
    """Who a request is: full access, or one session through its share link."""

    full: bool
    credential: str  # what the CSRF token is bound to: "local", "lan" or "share:<token>"


@dataclass
class Rendezvous:
    """The rendezvous the dashboard uses by default, and the embedded one if it runs."""

    embedded: Endpoint | None = None
    doctor_port: int | None = None  # the embedded rendezvous' NAT doctor, if it runs


CONFIG = web.AppKey("config", WebConfig)
STORE = web.AppKey("store", HistoryStore)
MANAGER = web.AppKey("manager", SessionManager)
GUARD = web.AppKey("guard", Guard)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
SECRET = web.AppKey("secret", bytes)
RENDEZVOUS = web.AppKey("rendezvous", Rendezvous)
LIVE_STREAMS = web.AppKey("live_streams", LiveStreams)
DOCTOR = web.AppKey("doctor", DoctorCache)
ACCESS = web.RequestKey("access", Access)
