"""Bad input and failures of the real ``nopf`` program: one line, non-zero, no traceback."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from nopf_web import __version__
from tests.loopback import fake_rendezvous
from tests.programs import argv, free_port


def run_nopf(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv("nopf", *args), input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-p", "3000", "-a", "1.2.3"], "missing ':PORT'"),
        (["-p", "3000", "-a", "host:99999"], "out of range"),
        (["-p", "99999", "-a", "127.0.0.1:3012"], "--localport 99999 is out of range"),
        (["-p", "abc", "-a", "127.0.0.1:3012"], "--localport 'abc' is not a port or HOST:PORT"),
        (["-a", "127.0.0.1:3012"], "-p/--localport"),
        (["-p", "3000", "-a", "127.0.0.1:3012", "--timeout", "soon"], "--timeout"),
        (["-p", "3000", "-a", "127.0.0.1:3012", "--punch-ttl", "1"], "--punch-ttl"),
        (["-p", "3000", "-a", "127.0.0.1:3012", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments(args: list[str], needle: str) -> None:
    assert_one_line_error(run_nopf(*args), 2, needle)


@pytest.mark.parametrize("command", [["nopf"], ["nopf", "share"], ["nopf", "connect"],
                                     ["nopf", "doctor"], ["nopf-server"], ["nopf-web"]])
def test_every_command_says_its_version(command: list[str]) -> None:
    proc = subprocess.run(argv(*command, "--version"), capture_output=True, text=True,
                          timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, f"{' '.join(command)} {__version__}\n", "")


def test_both_flag_forms_are_accepted() -> None:
    with fake_rendezvous("seed") as port:
        a = run_nopf("--localport=3000", f"--serveraddr=127.0.0.1:{port}", "--type=server",
                     stdin="garbage\n")
        b = run_nopf("--localport", "3000", "--serveraddr", f"127.0.0.1:{port}", "-t", "s",
                     stdin="garbage\n")
    for proc in (a, b):
        # Got as far as reading the peer's address: the flags were understood.
        assert proc.stdout.startswith("127.0.0.1:")
        assert_one_line_error(proc, 2, "bad peer address")


@pytest.mark.parametrize(
    ("stdin", "needle"),
    [("", "stdin closed before the peer's address"), ("\n", "empty address"),
     ("1.2.3\n", "missing ':PORT'"), ("1.2.3.4:99999\n", "out of range"),
     ("example.org:80\n", "not an IPv4 address")],
)
def test_bad_peer_address_on_stdin(stdin: str, needle: str) -> None:
    with fake_rendezvous("seed") as port:
        proc = run_nopf("-p", "3000", "-a", f"127.0.0.1:{port}", "-t", "server", stdin=stdin)
    first = proc.stdout.splitlines()[0]
    host, _, public_port = first.partition(":")
    assert host == "127.0.0.1" and public_port.isdigit()  # the contract's first line
    assert_one_line_error(proc, 2, needle)


def test_works_against_an_independent_seed_server() -> None:
    with fake_rendezvous("seed") as port:
        proc = run_nopf("-p", "3000", "-a", f"localhost:{port}", stdin="")
    assert proc.stdout.splitlines()[0].startswith("127.0.0.1:")


def test_rendezvous_refusing() -> None:
    port = free_port()
    assert_one_line_error(run_nopf("-p", "3000", "-a", f"127.0.0.1:{port}"), 1,
                          f"rendezvous 127.0.0.1:{port}", "connection refused")


def test_rendezvous_silent() -> None:
    with fake_rendezvous("silent") as port:
        t0 = time.monotonic()
        proc = run_nopf("-p", "3000", "-a", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 15
    assert_one_line_error(proc, 1, "sent no address within 5 s")


@pytest.mark.parametrize(("behaviour", "needle"),
                         [("garbage", "not a discovery reply"), ("short", "after 7 of 10 bytes")])
def test_rendezvous_answering_garbage(behaviour: str, needle: str) -> None:
    with fake_rendezvous(behaviour) as port:
        assert_one_line_error(run_nopf("-p", "3000", "-a", f"127.0.0.1:{port}"), 1, needle)


def test_rendezvous_name_that_does_not_resolve() -> None:
    proc = run_nopf("-p", "3000", "-a", "no-such-host.invalid:3012")
    assert_one_line_error(proc, 1, "could not resolve no-such-host.invalid")


def test_local_port_in_use() -> None:
    with socket.socket() as busy, fake_rendezvous("seed") as port:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        used = busy.getsockname()[1]
        proc = run_nopf("-p", str(used), "-a", f"127.0.0.1:{port}", "-t", "client")
    assert_one_line_error(proc, 1, f"local port {used} is already in use")
    assert proc.stdout == ""  # failed before discovery: nothing on stdout


def test_peer_never_arriving_times_out_with_the_cause() -> None:
    with fake_rendezvous("seed") as port:
        t0 = time.monotonic()
        proc = run_nopf("-p", "3000", "-a", f"127.0.0.1:{port}", "--timeout", "2",
                        stdin=f"127.0.0.1:{free_port()}\n")
    assert time.monotonic() - t0 < 10
    assert_one_line_error(proc, 1, "no connection to peer", "within 2 s")
