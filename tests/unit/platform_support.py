"""Take Unix-only features away from the running Python, as Windows or macOS lack them.

``take_away(monkeypatch, "sendmsg", "MSG_DONTWAIT", ...)`` removes them from the
``socket``/``os`` modules (and from the option numbers nopf knows of), so the
real code paths nopf takes on those systems run here, over real loopback
sockets. Each feature is removed the way Windows lacks it:

- ``sendmsg``: sockets have no ``sendmsg`` attribute (and asyncio, which checks
  for it once, writes with ``send`` as it does on Windows);
- ``MSG_DONTWAIT``, ``SO_REUSEPORT``: the ``socket`` module has no such name;
- ``IP_MINTTL``, ``TCP_INFO``: neither the module nor nopf's table of option
  numbers has them (Python 3.11 lacks IP_MINTTL even on Linux); ``TCP_INFO``
  takes macOS' ``TCP_CONNECTION_INFO`` too: no TCP facts, as on Windows;
- ``splice``: ``os.splice`` is gone.
"""

from __future__ import annotations

import asyncio.selector_events
import os
import socket
from typing import Any

import pytest

from nopf_web import sockets

FEATURES = ("sendmsg", "MSG_DONTWAIT", "SO_REUSEPORT", "IP_MINTTL", "TCP_INFO", "splice")
# Linux numbers, for tests that check a socket for what was (not) set on it.
SO_REUSEPORT_LINUX = 15


class SocketWithoutSendmsg(socket.socket):
    """A socket as on Windows: ``hasattr(sock, "sendmsg")`` is False."""

    @property
    def sendmsg(self) -> Any:
        raise AttributeError("'socket' object has no attribute 'sendmsg' (as on Windows)")


def take_away(monkeypatch: pytest.MonkeyPatch, *features: str) -> None:
    for feature in features:
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}")
        if feature == "sendmsg":
            # socket.socket's accept() builds its sockets with the module's name
            # ``socket``: accepted connections lack sendmsg too.
            monkeypatch.setattr(socket, "socket", SocketWithoutSendmsg)
            monkeypatch.setattr(asyncio.selector_events, "_HAS_SENDMSG", False, raising=False)
        elif feature == "splice":
            monkeypatch.delattr(os, "splice", raising=False)
        else:
            # TCP_INFO: macOS' TCP_CONNECTION_INFO too, so no system gives TCP facts.
            names = (feature, "TCP_CONNECTION_INFO") if feature == "TCP_INFO" else (feature,)
            for name in names:
                monkeypatch.delattr(socket, name, raising=False)
                for table in sockets._KNOWN_OPTIONS.values():
                    monkeypatch.delitem(table, name, raising=False)
