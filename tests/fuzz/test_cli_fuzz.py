"""Every command line, fuzzed: the real entry points' ``main(argv)`` in-process.

One flag at a time gets hostile text (arbitrary Unicode with lone surrogates,
NUL, digits ``int()`` refuses or reads, huge and negative numbers...), the others
stay valid. Each run either ends with exit status 2 and exactly one line on
stderr, ``PROG: error: ...``, or the program accepted the value, which must
then be what the flag's grammar allows (ASCII digits in range...). What an
accepted command line would do (serve, punch, pair) is replaced by a stub of
``run_main``: the parsing is what is under test; the real programs run in
the subprocess tests at the end, on the inputs from the issue.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import re
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import example, given, strategies as st

from nopf_web.cli import coordinated, doctor, peer, server, web
from nopf_web.sessions.path_machine import UPGRADE_CAP
from tests.fuzz.budget import fuzz, nasty_text
from tests.programs import argv as program_argv

ACCEPTED = 99  # what the stubbed run_main returns: the command line was taken
DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


@contextlib.contextmanager
def stubbed_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def run_main(coro: Coroutine[Any, Any, int]) -> int:
        coro.close()
        return ACCEPTED

    for module in (peer, coordinated, doctor, server, web):
        monkeypatch.setattr(module, "run_main", run_main)
    yield


def run(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def assert_refused_in_one_line(code: int, stderr: str, prog: str) -> None:
    assert code == 2, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    # "nopf share: error:" from argparse, "nopf: error:" from the program
    assert re.match(rf"{prog.split()[0]}( [a-z]+)?: error: \S", lines[0]), stderr
    assert "Traceback" not in stderr


def assert_taken_only_if_valid(monkeypatch: pytest.MonkeyPatch, main: Callable[[list[str]], int],
                               argv: list[str], prog: str, flag: str, value: str,
                               valid: Callable[[str], bool]) -> None:
    """``main(argv)``, its runs stubbed, takes the command line only if ``valid(value)``
    (``flag``'s value may be taken); otherwise it refuses it in one line."""
    with stubbed_runs(monkeypatch):
        code, stderr = run(main, argv)
    if code == ACCEPTED:
        assert valid(value), (flag, value)
    else:
        assert_refused_in_one_line(code, stderr, prog)


# What an accepted value must look like, per kind of flag.
def is_port(value: str, zero: bool = False) -> bool:
    v = value.strip()
    return v.isascii() and v.isdigit() and (0 if zero else 1) <= int(v) <= 65535


def is_seconds(value: str, maximum: float) -> bool:
    v = value.strip()
    return DECIMAL.fullmatch(v) is not None and 0 < float(v) <= maximum


def is_count(value: str) -> bool:
    v = value.strip()
    return v.isascii() and v.isdigit() and 1 <= int(v) <= 1_000_000


def is_ascii_line(value: str) -> bool:
    v = value.strip()
    return v.isascii() and v.isprintable()


def is_endpoint(value: str) -> bool:
    host, sep, port = value.strip().rpartition(":")
    return bool(sep) and is_ascii_line(host) and is_port(port)


def is_local(value: str) -> bool:
    """``--localport``: a port, or HOST:PORT."""
    return is_port(value) or is_endpoint(value)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return False
    return is_ascii_line(value)


PEER_FLAGS: dict[str, Callable[[str], bool]] = {
    "--localport": is_local, "--serveraddr": is_endpoint,
    "--timeout": lambda v: is_seconds(v, 86400), "--punch-ttl": lambda v: is_port(v, True)
    and int(v) != 1 and int(v) <= 255, "--type": lambda v: True,
}
PEER_BASE = {"--localport": "3000", "--serveraddr": "127.0.0.1:3012", "--timeout": "30",
             "--punch-ttl": "2", "--type": "server"}


@fuzz(ci=300)
@given(flag=st.sampled_from(sorted(PEER_FLAGS)), value=nasty_text)
@example(flag="--localport", value="²").via("the issue")
@example(flag="--serveraddr", value="1.2.3.4:²").via("the issue")
@example(flag="--timeout", value="nan")
@example(flag="--punch-ttl", value="٣")
def test_nopf_flags(monkeypatch: pytest.MonkeyPatch, flag: str, value: str) -> None:
    args = {**PEER_BASE, flag: value}
    assert_taken_only_if_valid(monkeypatch, peer.main,
                               [f"{k}={v}" for k, v in args.items()] + ["--no-guard"], "nopf",
                               flag, value, PEER_FLAGS[flag])


COORD_FLAGS: dict[str, Callable[[str], bool]] = {
    "--localport": is_local, "--serveraddr": is_endpoint,
    "--timeout": lambda v: is_seconds(v, 86400), "--keepalive": lambda v: is_seconds(v, 86400),
    "--code-lifetime": lambda v: is_seconds(v, 86400), "code": is_ascii_line,
    "--resume-budget": lambda v: is_seconds(v, 86400),
    "--retry-direct": lambda v: is_seconds(v, UPGRADE_CAP),
}


@fuzz(ci=300)
@given(command=st.sampled_from(["share", "connect"]), flag=st.sampled_from(sorted(COORD_FLAGS)),
       value=nasty_text)
@example(command="connect", flag="code", value="²-orbit-lantern")
@example(command="share", flag="--localport", value="²")
@example(command="share", flag="--localport", value="[::1]:²")
@example(command="connect", flag="--localport", value="0.0.0.0:3010")
@example(command="connect", flag="--localport", value="nas.local:3010")
@example(command="connect", flag="--resume-budget", value="٣")
@example(command="share", flag="--retry-direct", value="1e9")
def test_nopf_share_and_connect_flags(monkeypatch: pytest.MonkeyPatch, command: str, flag: str,
                                      value: str) -> None:
    args = {"--localport": "3000", "--serveraddr": "127.0.0.1:3012", "--timeout": "30",
            "--keepalive": "15"}
    if command == "share":
        args["--code-lifetime"] = "600"
    if flag == "code" and command == "share":
        flag = "--localport"
    if flag == "--code-lifetime" and command == "connect":
        flag = "--timeout"
    code_text = value if flag == "code" else "7-orbit-lantern"
    if flag != "code":
        args[flag] = value
    argv = [command, *(f"{k}={v}" for k, v in args.items())]
    if command == "connect":
        argv += ["--", code_text]
    assert_taken_only_if_valid(monkeypatch, peer.main, argv, f"nopf {command}", flag, value,
                               COORD_FLAGS[flag])


@fuzz(ci=200)
@given(flag=st.sampled_from(["--serveraddr", "--doctor-port"]), value=nasty_text)
@example(flag="--doctor-port", value="²")
def test_nopf_doctor_flags(monkeypatch: pytest.MonkeyPatch, flag: str, value: str) -> None:
    assert_taken_only_if_valid(
        monkeypatch, peer.main, ["doctor", "--serveraddr=127.0.0.1:3012", f"{flag}={value}"],
        "nopf doctor", flag, value, is_endpoint if flag == "--serveraddr" else is_port)


SERVER_FLAGS: dict[str, Callable[[str], bool]] = {
    "--host": is_ascii_line, "--port": lambda v: is_port(v, True), "--max-connections": is_count,
    "--max-per-source": is_count, "--doctor-port": lambda v: is_port(v, True),
    "--doctor-address": is_ip, "--relay-max-sessions": is_count,
    "--relay-max-per-source": is_count, "--relay-rate": is_ascii_line,
    "--relay-address": is_endpoint,
}


@fuzz(ci=300)
@given(flag=st.sampled_from(sorted(SERVER_FLAGS)), value=nasty_text)
@example(flag="--port", value="²").via("the issue")
@example(flag="--host", value="\x00")
@example(flag="--doctor-address", value="fe80::1%\x00")
@example(flag="--relay-rate", value="٣M")
def test_nopf_server_flags(monkeypatch: pytest.MonkeyPatch, flag: str, value: str) -> None:
    assert_taken_only_if_valid(monkeypatch, server.main, ["--port=3012", f"{flag}={value}"],
                               "nopf-server", flag, value, SERVER_FLAGS[flag])


WEB_FLAGS: dict[str, Callable[[str], bool]] = {
    "--host": is_ascii_line, "--port": lambda v: is_port(v, True), "--db": lambda v: "\0" not in v,
    "--rendezvous": lambda v: v == "" or is_endpoint(v), "--rendezvous-listen": is_endpoint,
    "--punch-timeout": lambda v: is_seconds(v, 3600),
}


@fuzz(ci=300)
@given(flag=st.sampled_from(sorted(WEB_FLAGS)), value=nasty_text)
@example(flag="--port", value="²").via("the issue")
@example(flag="--db", value="\x00")
@example(flag="--db", value="\ud800")
@example(flag="--host", value="\x00")
def test_nopf_web_flags(monkeypatch: pytest.MonkeyPatch, flag: str, value: str) -> None:
    assert_taken_only_if_valid(monkeypatch, web.main,
                               ["--db=/nonexistent/nopf.sqlite3", f"{flag}={value}"],
                               "nopf-web", flag, value, WEB_FLAGS[flag])


@fuzz(ci=300)
@given(argv=st.lists(nasty_text, max_size=6))
def test_arbitrary_argument_lists(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """Whole command lines of junk: argparse's own errors are one line too."""
    for main, prog in ((server.main, "nopf-server"), (web.main, "nopf-web")):
        with stubbed_runs(monkeypatch):
            code, stderr = run(main, argv)
        if code not in (0, ACCEPTED):  # 0: --help somewhere in the junk
            assert_refused_in_one_line(code, stderr, prog)


# -- the real programs, on the inputs from the issue --------------------------------------


@pytest.mark.parametrize(("program", "args", "needle"), [
    ("nopf-server", ["--port", "²"], "--port"),
    ("nopf-web", ["--port", "²"], "--port"),
    ("nopf-web", ["--rendezvous", "1.2.3.4:٣"], "--rendezvous"),
    ("nopf", ["-p", "²", "-a", "127.0.0.1:3012"], "--localport"),
    ("nopf", ["share", "-p", "3000", "--timeout", "１"], "--timeout"),
    ("nopf", ["connect", "²-orbit-lantern", "-p", "3000"], "must start with a number"),
    ("nopf", ["doctor", "--doctor-port", "²"], "--doctor-port"),
    ("nopf-server", ["--max-connections", "1_000"], "--max-connections"),
])
def test_the_real_programs_refuse_in_one_line(program: str, args: list[str], needle: str) -> None:
    proc = subprocess.run(program_argv(program, *args), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, \
        proc.stderr
