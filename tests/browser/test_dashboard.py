"""The dashboard in a real browser: Playwright driving Debian's chromium.

A real ``nopf-web`` process on loopback (temp database, embedded rendezvous
on a free port) is used as a person would: create a server session and a
client session, exchange their addresses, see both connect, push data
through the client's local port to a local echo service, see the bytes
counted, stop, and find both in History. Screenshots at 360 px and desktop
width go to $NOPF_SCREENSHOT_DIR (default: the test's temp directory).

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


def _start_session(page: Any, url: str, role: str, port: int, label: str) -> str:
    """Fill the new-session form; return the public address the session page shows."""
    page.goto(url)
    page.get_by_role("radio", name=re.compile("^Server" if role == "server" else "^Client")).check()
    page.get_by_label("Local port", exact=True).fill(str(port))
    page.get_by_role("textbox", name="Label (optional)").fill(label)
    page.get_by_role("button", name="Start session").click()
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
    public = page.locator("#public-address")
    public.wait_for(timeout=TIMEOUT_MS)  # appears through htmx polling
    return str(public.inner_text()).strip()


def test_two_sessions_connect_move_data_and_land_in_history(
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
    client_row = rows.filter(has_text="browser client")
    server_row = rows.filter(has_text="browser server")
    assert "stopped" in client_row.inner_text().lower()
    assert "closed" in server_row.inner_text().lower()
    assert "1.0 MiB / 1.0 MiB" in client_row.inner_text()
    history.get_by_label("Outcome").select_option("stopped")
    history.get_by_role("button", name="Filter").click()
    history.wait_for_url(re.compile(r"outcome=stopped"))  # htmx pushed the filtered URL
    history.locator("#hist-h", has_text="1 session").wait_for()
    history.screenshot(path=screens / "history-desktop.png", full_page=True)
    history.set_viewport_size({"width": 360, "height": 780})
    history.goto(dashboard + "history")
    history.screenshot(path=screens / "history-360.png", full_page=True)
    home = context.new_page()
    home.set_viewport_size({"width": 360, "height": 780})
    home.goto(dashboard)
    home.screenshot(path=screens / "sessions-360.png", full_page=True)
    home.set_viewport_size({"width": 1280, "height": 900})
    home.screenshot(path=screens / "sessions-desktop.png", full_page=True)
    context.close()
    assert not console_errors, console_errors  # e.g. a CSP violation or a failed htmx request
