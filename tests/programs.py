"""Locate and start nopf's real programs (console scripts of the installed package)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
_MODULES = {"nopf": "nopf_web.cli.peer", "nopf-server": "nopf_web.cli.server",
            "nopf-web": "nopf_web.cli.web"}


def check_programs_run_this_tree() -> None:
    """Raise unless the console scripts run this source tree's ``nopf_web``.

    A venv copied from another checkout keeps that checkout's editable install
    and its scripts' ``#!`` lines: tests and benchmarks would then run the other
    tree's code, and a before/after comparison would compare a tree with itself.
    """
    script = BIN / "nopf"
    if not script.exists():
        return  # argv() runs ``python -m`` from this tree
    with script.open("rb") as f:
        first = f.readline().decode(errors="replace").strip()
    interpreter = first[2:].split()[0] if first.startswith("#!") else sys.executable
    where = subprocess.run(
        [interpreter, "-I", "-c", "import nopf_web; print(nopf_web.__file__)"],
        capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    tree = Path(where).resolve().parents[1] if where else None
    if tree != ROOT:
        raise RuntimeError(f"{script} runs nopf_web from {tree or 'nowhere'}, not from "
                           f"{ROOT}: make this tree's own venv (./dev.sh)")


def argv(program: str, *args: str) -> list[str]:
    """The command line for ``program``: its console script if installed, else ``-m``."""
    script = BIN / program
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", _MODULES[program], *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(program: str, *args: str, **popen: Any) -> Iterator[IO[str]]:
    """``program`` running with ``args``; yields its stderr (text). On exit it gets SIGTERM
    and must exit with 0 within 10 s (else the test fails, and it is killed by PID)."""
    proc = subprocess.Popen(argv(program, *args), stderr=subprocess.PIPE, text=True, **popen)
    try:
        assert proc.stderr is not None
        yield proc.stderr
    finally:
        proc.terminate()
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:  # SIGTERM did not end it: leave no process behind
                proc.kill()
                proc.wait()
