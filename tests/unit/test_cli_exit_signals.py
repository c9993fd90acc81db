"""A stop signal that lands while a program is already exiting does not turn its
exit status into a kill (``nopf share`` whose peer just closed, stopped by a
supervisor's SIGTERM at the same moment, exits 0, not -15)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# The coroutine ends at once; SIGTERM arrives while the interpreter is still on its
# way out (a slow exit is simulated by the sleep after run_main).
PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from nopf_web.cli.common import run_main

    async def work() -> int:
        return {status}

    status = run_main(work())
    for _ in range({signals}):
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.2)
    print("exiting", status, flush=True)
    sys.exit(status)
""")


def run(status: int, sig: str, signals: int) -> subprocess.CompletedProcess[str]:
    code = PROGRAM.format(status=status, sig=sig, signals=signals)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("status", [0, 3])
def test_a_stop_signal_during_exit_keeps_the_exit_status(sig: str, status: int) -> None:
    done = run(status, sig, 1)
    assert (done.returncode, done.stdout) == (status, f"exiting {status}\n"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_during_exit_still_kills(sig: str) -> None:
    done = run(0, sig, 2)  # an exit that hangs can still be stopped
    assert done.returncode == -getattr(signal, sig)
    assert done.stdout == ""
