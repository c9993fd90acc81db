"""Locate and start nopf's real programs (console scripts of the installed package)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
_MODULES = {"nopf": "nopf_web.cli.peer", "nopf-server": "nopf_web.cli.server",
            "nopf-web": "nopf_web.cli.web"}


def argv(program: str, *args: str) -> list[str]:
    """The command line for ``program``: its console script if installed, else ``-m``."""
    script = BIN / program
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", _MODULES[program], *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
