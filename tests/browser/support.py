"""What the browser tests share: Debian's chromium under Playwright, whether it can run,
where screenshots go, and a page that reports its console errors."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.lab import Host
from tests.prerequisites import require

if TYPE_CHECKING:  # playwright may be missing: the tests then skip
    from playwright.sync_api import ViewportSize

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 360, "height": 780}


def _unavailable() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is missing (pip install playwright)"
    return None


def require_browser() -> None:
    """Skip the test when chromium or playwright is missing; under CI=true, fail it."""
    require(_unavailable(), "browser test cannot run")


def screens_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $NOPF_SCREENSHOT_DIR, else the test's temp directory."""
    out = Path(os.environ.get("NOPF_SCREENSHOT_DIR") or tmp_path / "screens")
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot_both(page: Any, screens: Path, name: str) -> None:
    """Full-page screenshots ``name``-desktop.png and ``name``-360.png (phone width); the
    page is left at desktop width."""
    page.screenshot(path=screens / f"{name}-desktop.png", full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=screens / f"{name}-360.png", full_page=True)
    page.set_viewport_size(DESKTOP)


def console_errors(*pages: Any) -> list[str]:
    """A list to which every error that one of ``pages`` logs to its console is added."""
    errors: list[str] = []
    for page in pages:
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return errors


@contextlib.contextmanager
def page_in(host: Host) -> Iterator[Any]:
    """A desktop-sized page of a chromium that Playwright's driver starts inside ``host``'s
    namespace (so it reaches that host's loopback); when the block ends normally, the page
    must have logged no console error."""
    from playwright.sync_api import sync_playwright

    with host.enter(), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=DESKTOP)
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            errors = console_errors(page)
            yield page
            context.close()
            assert not errors, errors
        finally:
            browser.close()
