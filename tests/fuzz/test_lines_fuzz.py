"""The text surfaces that are not flags or HTTP: the peer line ``nopf`` reads on stdin,
pairing codes (typed, pasted, or sent in a form), and the settings the dashboard
reads back from its database at start."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, strategies as st

from nopf_web.cli import peer
from nopf_web.db import HistoryStore
from nopf_web.inputs import InputError
from nopf_web.pairing import BadCode, parse_code
from nopf_web.pairing_words import WORDS
from nopf_web.web.app import _stored_rendezvous
from nopf_web.web.views import SETTING_RENDEZVOUS
from nopf_web.wire.address import Endpoint, parse_host_endpoint
from tests.fuzz.budget import fuzz, nasty_text
from tests.loopback import fake_rendezvous
from tests.programs import argv

lines = st.one_of(nasty_text, nasty_text.map(lambda t: t + "\n"),
                  st.tuples(st.sampled_from(["1.2.3.4", "127.0.0.1", "0.0.0.0", "224.0.0.1"]),
                            nasty_text).map(lambda t: f"{t[0]}:{t[1]}\n"))


@fuzz(ci=500)
@given(line=lines)
@example(line="1.2.3.4:²\n").via("the issue")
@example(line="1.2.3.4:٣\n")
@example(line="1.2.3.4:1\x00\n")
def test_peer_line(line: str) -> None:
    """What ``nopf`` does with the line it read: an IPv4 endpoint in ASCII, or an
    InputError naming the peer address (exit 2, one line)."""
    try:
        got = peer._parse_peer_line(line)
    except InputError as exc:
        assert exc.field == peer.PEER_FIELD and "\n" not in str(exc)
        return
    assert str(got).isascii() and str(got) == line.strip()
    assert 1 <= got.port <= 65535


@contextlib.contextmanager
def stdin(text: str) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


@pytest.mark.parametrize("line", ["1.2.3.4:²\n", "1.2.3.4:٣\n", "\ud800:1\n", "\x00\n",
                                  "1.2.3.4:" + "9" * 400, "1.2.3.4:1_0\n", "1.2.3.4:+5\n"])
def test_peer_line_through_the_real_entry_point(line: str) -> None:
    """``nopf`` in-process against a loopback seed server: the line after our address is
    refused with exit 2 and one error line."""
    err, out = io.StringIO(), io.StringIO()
    with fake_rendezvous("seed") as port, stdin(line), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(out):
        code = peer.main(["-p", "3000", "-a", f"127.0.0.1:{port}", "-t", "server", "--no-guard"])
    assert code == 2, err.getvalue()
    errors = [x for x in err.getvalue().splitlines() if "error:" in x]
    assert len(errors) == 1 and "peer address" in errors[0], err.getvalue()
    assert out.getvalue().startswith("127.0.0.1:")  # the contract's first line came first


@pytest.mark.parametrize(("line", "needle"), [("1.2.3.4:²\n".encode(), "bad peer address"),
                                           (b"1.2.3.4:\xff\xfe\n", "invalid characters")])
def test_the_peer_line_from_the_issue_with_the_real_program(line: bytes, needle: str) -> None:
    with fake_rendezvous("seed") as port:
        proc = subprocess.run(argv("nopf", "-p", "3000", "-a", f"127.0.0.1:{port}", "-t", "server",
                                   "--no-guard"), input=line, capture_output=True,
                              timeout=30, check=False, env={**os.environ, "LC_ALL": "C.UTF-8"})
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    errors = [x for x in stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and needle in errors[0], stderr


codes = st.one_of(
    nasty_text,
    st.tuples(st.one_of(st.integers(-10, 10**7).map(str), nasty_text),
              st.sampled_from(WORDS), st.one_of(st.sampled_from(WORDS), nasty_text),
              st.sampled_from(["-", " ", "--", " - ", "\u2028", "\xa0"])).map(
        lambda t: t[3].join(t[:3])),
)


@fuzz(ci=500)
@given(text=codes)
@example(text="²-orbit-lantern").via("the issue")
@example(text="٣-orbit-lantern")
@example(text="7-ORBIT-lantern\x00")
def test_pairing_codes(text: str) -> None:
    try:
        code = parse_code(text)
    except BadCode as exc:
        assert exc.field == "code" and "\n" not in str(exc)
        return
    assert str(code).isascii() and parse_code(str(code)) == code
    assert 1 <= code.nameplate <= 999_999


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop,
                                                                      HistoryStore]]:
    loop = asyncio.new_event_loop()
    path: Path = tmp_path_factory.mktemp("fuzz-settings") / "history.sqlite3"
    opened = loop.run_until_complete(HistoryStore.open(path, flush_interval=0.01))
    try:
        yield loop, opened
    finally:
        loop.run_until_complete(opened.close())
        loop.close()


@fuzz(ci=300)
@given(value=nasty_text)
@example(value="127.0.0.1:²").via("the issue")
def test_stored_settings(store: tuple[asyncio.AbstractEventLoop, HistoryStore],
                         value: str) -> None:
    """A stored default rendezvous is read back through the same parser: a bad one is
    ignored (one warning) and the dashboard starts with its default."""
    loop, history = store
    stored = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # SQLite text

    async def read_back() -> Endpoint | None:
        await history.set_setting(SETTING_RENDEZVOUS, stored)
        return await _stored_rendezvous(history)
    got = loop.run_until_complete(read_back())
    if got is not None:
        assert got == parse_host_endpoint(stored) and str(got).isascii()
