"""The dashboard in a real browser: Playwright driving Debian's chromium.

A real ``nopf-web`` process on loopback (temp database, embedded rendezvous
on a free port) is used as a person would. The main flow uses the default
pairing-code mode: create a server session, copy its code with the page's
copy button, paste it into a new client session, see both connect, push
data through several connections to the client's local port (a local echo
service answers), see the bytes counted, stop, and find both in History. The
seed's manual-address flow (exchange public addresses) is covered too, and
the live page's promises: a copy button keeps its "Copied" label and the
focus while values stream in around it, and without JavaScript a session
page still shows the session, with a refresh link. A session sharing two services
over one code is reached through a port for each, starts again from its settings,
and is deleted from the history after the page that asks.
Screenshots at 360 px and desktop width go to $NOPF_SCREENSHOT_DIR (default:
the test's temp directory).

Skipped when chromium or playwright is missing, except under CI=true,
where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.loopback import echo_service, tcp_service
from tests.programs import free_port

from .support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    TIMEOUT_MS,
    console_errors,
    require_browser,
    screens_dir,
    screenshot_both,
)

pytestmark = pytest.mark.browser

@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    """A real nopf-web on loopback; yields its URL."""
    script = Path(sys.executable).parent / "nopf-web"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "nopf_web.cli.web"]
    proc = subprocess.Popen(
        [*argv, "--port", "0", "--db", str(tmp_path / "history.sqlite3"),
         "--rendezvous-listen", f"127.0.0.1:{free_port()}", "--no-guard",
         "--punch-timeout", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else url
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _desktop(browser: Any, dashboard: str, *, clipboard: bool = False) -> Any:
    """A desktop-sized browser context with the tests' default timeout (``clipboard``:
    pages of the dashboard may read and write the clipboard)."""
    context = browser.new_context(viewport=DESKTOP)
    if clipboard:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=dashboard[:-1])
    context.set_default_timeout(TIMEOUT_MS)
    return context


def _fill_new_session(page: Any, url: str, role: str, port: int, label: str) -> None:
    page.goto(url)
    page.get_by_role("radio", name=re.compile("^Server" if role == "server" else "^Client")).check()
    page.get_by_label("Local port", exact=True).fill(str(port))
    page.get_by_role("textbox", name="Label (optional)").fill(label)


def _echo(app: socket.socket, size: int) -> bool:
    """Send ``size`` random bytes through the application connection; whether they all
    come back intact."""
    payload = os.urandom(size)
    app.sendall(payload)
    echoed = bytearray()
    while len(echoed) < len(payload):
        chunk = app.recv(65536)
        assert chunk, "the tunnel closed early"
        echoed += chunk
    return hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def _echo_through(port: int, size: int) -> bool:
    """One application connection: send ``size`` random bytes, check the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as app:
        return _echo(app, size)


def _wait_counted(pages: tuple[Any, ...], sent: int) -> None:
    """Until each page's bytes-out counter says ``sent`` (it comes by the event stream)."""
    for page in pages:
        page.wait_for_function("n => document.querySelector('#bytes-out')?.dataset.bytes == n",
                               arg=str(sent))


def _stop(page: Any) -> None:
    """Click the session page's "Stop session"; until its badge says stopped."""
    page.get_by_role("button", name="Stop session").click()
    page.locator("#live .badge-stopped").wait_for()


def _stop_both(client_page: Any, server_page: Any) -> None:
    """Stop the client's session: it ends stopped, and the server's ends closed (the
    peer's end closed it)."""
    _stop(client_page)
    server_page.locator("#live .badge-closed").wait_for()


def _history_rows(context: Any, dashboard: str) -> tuple[Any, Any]:
    """A new page on the History; it and its table's rows."""
    history = context.new_page()
    history.goto(dashboard + "history")
    return history, history.locator("table.history tbody tr")


def test_a_client_joins_with_the_copied_code_and_carries_many_connections(
        dashboard: str, browser: Any, tmp_path: Path) -> None:
    screens = screens_dir(tmp_path)
    context = _desktop(browser, dashboard, clipboard=True)
    server_page, client_page = context.new_page(), context.new_page()
    errors = console_errors(server_page, client_page)
    streams, size = 6, 256 * 1024

    with echo_service() as echo_port:
        app_port = free_port()
        _fill_new_session(server_page, dashboard, "server", echo_port, "browser share")
        # Pairing code is the default, and a server takes no code.
        assert server_page.get_by_role("radio", name=re.compile("^Pairing code")).is_checked()
        assert not server_page.get_by_label("Pairing code (client)").is_visible()
        server_page.get_by_role("button", name="Start session").click()
        server_page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
        shown = server_page.locator("#pairing-code")
        shown.wait_for()  # pushed by the page's event stream
        code = str(shown.inner_text()).strip()
        assert re.fullmatch(r"[1-9][0-9]*-[a-z]+-[a-z]+", code), code
        invite = str(server_page.locator("#invite").inner_text())
        assert f"nopf connect {code} -p PORT" in invite
        # What the invitation's copy button copies is what the page shows.
        copy_invite = server_page.get_by_role("button", name="Copy the invitation")
        assert copy_invite.get_attribute("data-copy") == invite
        assert server_page.get_by_label("Peer's public address").count() == 0
        server_page.get_by_role("button", name="Copy the pairing code").click()
        copied = str(server_page.evaluate("navigator.clipboard.readText()"))
        assert copied == code
        screenshot_both(server_page, screens, "share")

        _fill_new_session(client_page, dashboard, "client", app_port, "browser join")
        code_field = client_page.get_by_label("Pairing code (client)")
        assert code_field.is_visible()  # shown once "Client" is chosen
        code_field.fill(copied)
        screenshot_both(client_page, screens, "join-form")
        client_page.get_by_role("button", name="Start session").click()
        client_page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
        for page in (server_page, client_page):
            page.locator("#live .badge-connected").wait_for()
        assert client_page.locator("#pairing-code").inner_text() == code
        assert server_page.locator("#invite").count() == 0  # used: nothing left to send

        with ThreadPoolExecutor(streams) as pool:
            assert all(pool.map(_echo_through, [app_port] * streams, [size] * streams))
        _wait_counted((client_page, server_page), streams * size)
        assert client_page.locator("#bytes-in").inner_text() == "1.5 MiB"
        screenshot_both(client_page, screens, "session")

        _stop_both(client_page, server_page)

    history, rows = _history_rows(context, dashboard)
    assert rows.count() == 2
    for label, outcome in (("browser join", "stopped"), ("browser share", "closed")):
        text = rows.filter(has_text=label).inner_text().lower()
        assert outcome in text and "coordinated" in text and code in text
    screenshot_both(history, screens, "history")
    context.close()
    assert not errors, errors


def _start_session(page: Any, url: str, role: str, port: int, label: str) -> str:
    """Fill the new-session form in seed mode; return the public address the page shows."""
    page.goto(url)
    page.get_by_role("radio", name=re.compile("^Server" if role == "server" else "^Client")).check()
    page.get_by_role("radio", name=re.compile("^Manual addresses")).check()
    assert not page.get_by_label("Pairing code (client)").is_visible()
    page.get_by_label("Local port", exact=True).fill(str(port))
    page.get_by_role("textbox", name="Label (optional)").fill(label)
    page.get_by_role("button", name="Start session").click()
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
    public = page.locator("#public-address")
    public.wait_for(timeout=TIMEOUT_MS)  # pushed by the page's event stream
    return str(public.inner_text()).strip()


def test_seed_mode_sessions_exchange_addresses_connect_and_land_in_history(
        dashboard: str, browser: Any, tmp_path: Path) -> None:
    screens = screens_dir(tmp_path)
    context = _desktop(browser, dashboard)
    server_page, client_page = context.new_page(), context.new_page()
    errors = console_errors(server_page, client_page)

    with echo_service() as echo_port:
        app_port = free_port()
        server_public = _start_session(server_page, dashboard, "server", echo_port,
                                       "browser server")
        client_public = _start_session(client_page, dashboard, "client", app_port,
                                       "browser client")
        assert re.fullmatch(r"127\.0\.0\.1:\d+", server_public)

        # Each side enters the other's public address, as two people would.
        for page, peer in ((server_page, client_public), (client_page, server_public)):
            page.get_by_label("Peer's public address").fill(peer)
            page.get_by_role("button", name="Connect").click()
        for page in (server_page, client_page):
            page.locator("#live .badge-connected").wait_for()
        assert client_page.locator("#peer-address").inner_text() == server_public

        with socket.create_connection(("127.0.0.1", app_port), timeout=10) as app:
            assert _echo(app, 1 << 20)
            _wait_counted((client_page, server_page), 1 << 20)
            assert client_page.locator("#bytes-in").inner_text() == "1.0 MiB"
            screenshot_both(client_page, screens, "seed-session")

            _stop(client_page)
        server_page.locator("#live .badge-closed").wait_for()  # the peer's end closed it (app gone)

    history, rows = _history_rows(context, dashboard)
    assert rows.count() == 2
    client_row = rows.filter(has_text="browser client")
    server_row = rows.filter(has_text="browser server")
    assert "stopped" in client_row.inner_text().lower()
    assert "closed" in server_row.inner_text().lower()
    assert "1.0 MiB / 1.0 MiB" in client_row.inner_text()
    assert "seed" in client_row.inner_text() and "seed" in server_row.inner_text()
    history.get_by_label("Outcome").select_option("stopped")
    history.get_by_role("button", name="Filter").click()
    history.wait_for_url(re.compile(r"outcome=stopped"))  # htmx pushed the filtered URL
    history.locator("#hist-h", has_text="1 session").wait_for()
    history.screenshot(path=screens / "seed-history-desktop.png", full_page=True)
    home = context.new_page()
    home.goto(dashboard)
    screenshot_both(home, screens, "sessions")
    context.close()
    assert not errors, errors  # e.g. a CSP violation or a failed htmx request


def _api_session(url: str, **body: Any) -> dict[str, Any]:
    """POST /api/sessions to the dashboard at ``url``; the new session."""
    request = urllib.request.Request(url + "api/sessions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def _poll(check: Callable[[], bool], what: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    # From Python, not wait_for_function: the page's own timers are paused below.
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def test_a_copy_button_keeps_its_label_and_focus_through_live_updates(
        dashboard: str, browser: Any, tmp_path: Path) -> None:
    context = _desktop(browser, dashboard, clipboard=True)
    context.clock.install()  # page timers run as usual until paused
    page = context.new_page()
    errors = console_errors(page)
    session = _api_session(dashboard, role="server", local_port=free_port(), label="copy me")
    page.goto(f"{dashboard}sessions/{session['id']}")
    page.locator("#pairing-code").wait_for()  # pushed by the stream
    page.evaluate("""() => {
        window.liveUpdates = [];
        document.addEventListener("htmx:sseMessage", (e) => window.liveUpdates.push(e.type));
    }""")
    button = page.get_by_role("button", name="Copy the pairing code")
    button.click()
    _poll(lambda: button.inner_text() == "Copied", "the Copied label")
    # Hold the label's own 1.5 s timer, so it is the stream that has to leave it alone.
    page.clock.pause_at(float(page.evaluate("Date.now()")) / 1000 + 0.01)  # in seconds
    elapsed = [page.locator("#elapsed").inner_text()]

    def ticked() -> bool:
        now = page.locator("#elapsed").inner_text()
        if now != elapsed[-1]:
            elapsed.append(now)
        return len(elapsed) >= 4

    _poll(ticked, "three live updates of the elapsed time")
    assert int(page.evaluate("window.liveUpdates.length")) >= 3
    assert button.inner_text() == "Copied"
    assert button.evaluate("b => b.isConnected && document.activeElement === b")
    assert str(page.evaluate("navigator.clipboard.readText()")) == \
        page.locator("#pairing-code").inner_text()
    page.clock.resume()
    _poll(lambda: button.inner_text() == "Copy", "the label back to Copy")  # its own timer
    assert button.evaluate("b => document.activeElement === b")
    context.close()
    assert not errors, errors


def test_without_javascript_a_session_page_shows_the_session_and_a_refresh_link(
        dashboard: str, browser: Any) -> None:
    context = browser.new_context(java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    session = _api_session(dashboard, role="server", local_port=free_port(), label="no script")
    page.goto(f"{dashboard}sessions/{session['id']}")
    assert page.get_by_role("heading", name="no script").is_visible()
    assert page.locator("#live .badge").is_visible()
    refresh = page.get_by_role("link", name="refresh")
    assert refresh.is_visible()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while page.locator("#pairing-code").count() == 0:  # refresh until the code is allocated
        assert time.monotonic() < deadline, "no pairing code after refreshing"
        time.sleep(0.2)
        page.get_by_role("link", name="refresh").click()
        page.wait_for_load_state()
    code = page.locator("#pairing-code").inner_text()
    assert re.fullmatch(r"[1-9][0-9]*-[a-z]+-[a-z]+", code), code
    assert page.locator("#live .badge-waiting_peer").is_visible()
    assert page.locator("#elapsed").is_visible() and page.locator("#bytes-in").is_visible()
    _stop(page)  # a plain form post
    assert page.get_by_role("link", name="refresh").count() == 0  # nothing left to update
    context.close()


def _tagging(tag: bytes) -> Callable[[socket.socket], None]:
    """A tcp_service handler: what it reads until EOF comes back after ``tag``."""
    def handle(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(tag + data)
    return handle


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as app:
        app.sendall(b"hello")
        app.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := app.recv(65536):
            answer += chunk
        return answer


def test_two_services_over_one_code_then_start_again_and_delete(
        dashboard: str, browser: Any) -> None:
    """A server session shares two services, typed in one field; the client lists a
    port for each and reaches each service. Then a finished session starts again from
    its settings, and another is deleted from the history after the page that asks."""
    context = _desktop(browser, dashboard)
    server_page, client_page = context.new_page(), context.new_page()
    errors = console_errors(server_page, client_page)
    with tcp_service(_tagging(b"A:")) as first, tcp_service(_tagging(b"B:")) as second:
        ports = [free_port(), free_port()]
        _fill_new_session(server_page, dashboard, "server", first, "two services")
        server_page.get_by_label("Local port", exact=True).fill(f"{first}, 127.0.0.1:{second}")
        server_page.get_by_role("button", name="Start session").click()
        server_page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
        server_page.locator("#pairing-code").wait_for()
        code = str(server_page.locator("#pairing-code").inner_text()).strip()
        assert f"nopf connect {code} -p PORT -p PORT -a" in server_page.locator(
            "#invite").inner_text()
        _fill_new_session(client_page, dashboard, "client", ports[0], "two ports")
        client_page.get_by_label("Local port", exact=True).fill(f"{ports[0]}, {ports[1]}")
        client_page.get_by_label("Pairing code (client)").fill(code)
        client_page.get_by_role("button", name="Start session").click()
        client_page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
        for page in (server_page, client_page):
            page.locator("#live .badge-connected").wait_for()
        assert (_ask(ports[0]), _ask(ports[1])) == (b"A:hello", b"B:hello")
        _stop_both(client_page, server_page)

    client_page.reload()  # a finished session's page: what comes after
    client_page.get_by_role("link", name="Start again with these settings").click()
    client_page.wait_for_url(re.compile(r"/\?again=[0-9a-f]{12}$"))
    assert client_page.get_by_label("Local port", exact=True).input_value() == \
        f"{ports[0]}, {ports[1]}"
    assert client_page.get_by_role("radio", name=re.compile("^Client")).is_checked()
    assert client_page.get_by_label("Pairing code (client)").input_value() == ""
    assert "ask the sharer for a new one" in client_page.locator("#again").inner_text()

    server_page.reload()
    server_page.get_by_role("link", name="Delete from the history…").click()
    assert "Delete the session “two services”" in server_page.locator(
        "#delete-what").inner_text()
    server_page.get_by_role("button", name="Delete 1 session").click()
    server_page.wait_for_url(re.compile(r"/history\?deleted=1$"))
    assert server_page.locator("#deleted").inner_text() == \
        "Deleted 1 session from the history."
    rows = server_page.locator("table.history tbody tr")
    assert rows.count() == 1 and "two ports" in rows.inner_text()
    context.close()
    assert not errors, errors
