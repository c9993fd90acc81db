"""The dashboard in a real browser: Playwright driving Debian's chromium.

A real ``nopf-web`` process on loopback (temp database, embedded rendezvous
on a free port) is used as a person would. The main flow uses the default
pairing-code mode: create a server session, copy its code with the page's
copy button, paste it into a new client session, see both connect, push
data through several connections to the client's local port (a local echo
service answers), see the bytes counted, stop, and find both in History. The
seed's manual-address flow (exchange public addresses) is covered too.
Screenshots at 360 px and desktop width go to $NOPF_SCREENSHOT_DIR (default:
the test's temp directory).

Skipped when chromium or playwright is missing, except under CI=true,
where that is a failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.web_support import echo_service
from tests.programs import free_port

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000


def _unavailable() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is missing (pip install playwright)"
    return None


def _require_browser() -> None:
    reason = _unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


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
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _screens(tmp_path: Path) -> Path:
    out = Path(os.environ.get("NOPF_SCREENSHOT_DIR") or tmp_path / "screens")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fill_new_session(page: Any, url: str, role: str, port: int, label: str) -> None:
    page.goto(url)
    page.get_by_role("radio", name=re.compile("^Server" if role == "server" else "^Client")).check()
    page.get_by_label("Local port", exact=True).fill(str(port))
    page.get_by_role("textbox", name="Label (optional)").fill(label)


def _echo_through(port: int, size: int) -> bool:
    """One application connection: send ``size`` random bytes, check the echo."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as app:
        app.sendall(payload)
        echoed = bytearray()
        while len(echoed) < len(payload):
            chunk = app.recv(65536)
            assert chunk, "the tunnel closed early"
            echoed += chunk
    return hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_a_client_joins_with_the_copied_code_and_carries_many_connections(
        dashboard: str, browser: Any, tmp_path: Path) -> None:
    screens = _screens(tmp_path)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=dashboard[:-1])
    context.set_default_timeout(TIMEOUT_MS)
    server_page, client_page = context.new_page(), context.new_page()
    console_errors: list[str] = []
    for page in (server_page, client_page):
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
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
        shown.wait_for()  # appears through htmx polling
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
        server_page.screenshot(path=screens / "share-desktop.png", full_page=True)
        server_page.set_viewport_size({"width": 360, "height": 780})
        server_page.screenshot(path=screens / "share-360.png", full_page=True)
        server_page.set_viewport_size({"width": 1280, "height": 900})

        _fill_new_session(client_page, dashboard, "client", app_port, "browser join")
        code_field = client_page.get_by_label("Pairing code (client)")
        assert code_field.is_visible()  # shown once "Client" is chosen
        code_field.fill(copied)
        client_page.set_viewport_size({"width": 360, "height": 780})
        client_page.screenshot(path=screens / "join-form-360.png", full_page=True)
        client_page.set_viewport_size({"width": 1280, "height": 900})
        client_page.screenshot(path=screens / "join-form-desktop.png", full_page=True)
        client_page.get_by_role("button", name="Start session").click()
        client_page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
        for page in (server_page, client_page):
            page.locator("#live .badge-connected").wait_for()
        assert client_page.locator("#pairing-code").inner_text() == code
        assert server_page.locator("#invite").count() == 0  # used: nothing left to send

        with ThreadPoolExecutor(streams) as pool:
            assert all(pool.map(_echo_through, [app_port] * streams, [size] * streams))
        for page in (client_page, server_page):  # the counters reach the page by polling
            page.wait_for_function(
                "n => document.querySelector('#bytes-out')?.dataset.bytes == n",
                arg=str(streams * size))
        assert client_page.locator("#bytes-in").inner_text() == "1.5 MiB"
        client_page.screenshot(path=screens / "session-desktop.png", full_page=True)
        client_page.set_viewport_size({"width": 360, "height": 780})
        client_page.screenshot(path=screens / "session-360.png", full_page=True)
        client_page.set_viewport_size({"width": 1280, "height": 900})

        client_page.get_by_role("button", name="Stop session").click()
        client_page.locator("#live .badge-stopped").wait_for()
        server_page.locator("#live .badge-closed").wait_for()  # the peer's end closed it

    history = context.new_page()
    history.goto(dashboard + "history")
    rows = history.locator("table.history tbody tr")
    assert rows.count() == 2
    for label, outcome in (("browser join", "stopped"), ("browser share", "closed")):
        text = rows.filter(has_text=label).inner_text().lower()
        assert outcome in text and "coordinated" in text and code in text
    history.screenshot(path=screens / "history-desktop.png", full_page=True)
    history.set_viewport_size({"width": 360, "height": 780})
    history.screenshot(path=screens / "history-360.png", full_page=True)
    context.close()
    assert not console_errors, console_errors


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
    public.wait_for(timeout=TIMEOUT_MS)  # appears through htmx polling
    return str(public.inner_text()).strip()


def test_seed_mode_sessions_exchange_addresses_connect_and_land_in_history(
        dashboard: str, browser: Any, tmp_path: Path) -> None:
    screens = _screens(tmp_path)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    server_page, client_page = context.new_page(), context.new_page()
    console_errors: list[str] = []
    for page in (server_page, client_page):
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

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

        payload = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", app_port), timeout=10) as app:
            app.sendall(payload)
            echoed = bytearray()
            while len(echoed) < len(payload):
                chunk = app.recv(65536)
                assert chunk, "the tunnel closed early"
                echoed += chunk
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            # The counters reach the page through polling.
            for page in (client_page, server_page):
                page.wait_for_function(
                    "n => document.querySelector('#bytes-out')?.dataset.bytes == n",
                    arg=str(len(payload)))
            assert client_page.locator("#bytes-in").inner_text() == "1.0 MiB"
            client_page.screenshot(path=screens / "seed-session-desktop.png", full_page=True)
            client_page.set_viewport_size({"width": 360, "height": 780})
            client_page.screenshot(path=screens / "seed-session-360.png", full_page=True)
            client_page.set_viewport_size({"width": 1280, "height": 900})

            client_page.get_by_role("button", name="Stop session").click()
            client_page.locator("#live .badge-stopped").wait_for()
        server_page.locator("#live .badge-closed").wait_for()  # the peer's end closed it

    history = context.new_page()
    history.goto(dashboard + "history")
    rows = history.locator("table.history tbody tr")
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
    home.set_viewport_size({"width": 360, "height": 780})
    home.goto(dashboard)
    home.screenshot(path=screens / "sessions-360.png", full_page=True)
    home.set_viewport_size({"width": 1280, "height": 900})
    home.screenshot(path=screens / "sessions-desktop.png", full_page=True)
    context.close()
    assert not console_errors, console_errors  # e.g. a CSP violation or a failed htmx request
