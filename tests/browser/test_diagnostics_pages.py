"""The path prediction, the pairing timeline and the Statistics page in a real browser,
with two real dashboards behind two real NATs.

``nopf-web`` on a1 (behind the lab's ``rst`` NAT) and on b1 (behind a ``symmetric``
NAT), a real nopf-server on rdv. Each dashboard's NAT doctor measures first (a1's
through its Doctor page in the browser, b1's through ``GET /api/doctor``), so each
hello carries its report. a1 shares from the browser; b1 joins with the code through
its API. The pairing is predicted ``relay`` (a symmetric joiner facing a NAT) before
the first SYN, punches its short budget, and goes through the relay: a1's session
page shows the prediction held and the timeline (the fire, every SYN with its TTL and
answer, the relay), and the Statistics page counts it by NAT pair and by path, with
its SVG charts; changing the range swaps the body with htmx. Screenshots go to
$NOPF_SCREENSHOT_DIR (default: the test's temp directory).

Skipped when chromium or playwright is missing, or labs cannot be built, except
under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.peers import start_doctor_server
from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, Host, Lab
from tests.programs import argv, free_port

from .support import PHONE, page_in, require_browser, screens_dir

pytestmark = [pytest.mark.browser, pytest.mark.lab]


def start_web(host: Host, db: Path) -> str:
    proc = host.popen(argv("nopf-web", "--port", "0", "--db", str(db), "--rendezvous",
                           f"{RDV_IP}:3012", "--no-guard", "--punch-timeout", "10"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    assert url.startswith("http://127.0.0.1:"), url
    return url


def api(host: Host, url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A JSON request to the dashboard at ``url`` from inside ``host``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json"})
    with host.enter(), urllib.request.urlopen(request, timeout=20) as resp:
        return json.load(resp)


@pytest.fixture
def two_dashboards(lab_factory: LabFactory, tmp_path: Path) -> Iterator[tuple[Lab, str, str]]:
    require_browser()
    lab = lab_factory("rst", "symmetric", delay_ms=10, rdv_second_ip=True)
    start_doctor_server(lab)
    yield lab, start_web(lab.a1, tmp_path / "a.sqlite3"), start_web(lab.b1, tmp_path / "b.sqlite3")


def test_prediction_timeline_and_statistics(two_dashboards: tuple[Lab, str, str],
                                            tmp_path: Path) -> None:
    lab, url_a, url_b = two_dashboards
    screens = screens_dir(tmp_path)
    report_b = api(lab.b1, url_b, "/api/doctor")
    assert report_b["mapping"] == "address-and-port-dependent", report_b
    with page_in(lab.a1) as page:  # the driver and chromium start in a1
        _session(page, lab, url_a, url_b, screens)
        _statistics(page, screens)


def _session(page: Any, lab: Lab, url_a: str, url_b: str, screens: Path) -> None:
    page.goto(url_a + "doctor")  # measures: the report our hello will carry
    assert page.locator("#doctor-mapping dd").inner_text().startswith("endpoint-independent")
    page.get_by_role("link", name="Sessions").click()
    page.get_by_role("radio", name=re.compile("^Server")).check()
    page.get_by_label("Local port", exact=True).fill("3000")
    page.get_by_role("textbox", name="Label (optional)").fill("share behind rst")
    page.get_by_role("button", name="Start session").click()
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{12}$"))
    page.locator("#pairing-code").wait_for()
    code = page.locator("#pairing-code").inner_text().strip()
    assert page.locator("#local-rendezvous").count() == 0  # a rendezvous on the internet
    joined = api(lab.b1, url_b, "/api/sessions", {"role": "client", "local_port": free_port(),
                                                  "code": code})
    assert joined["mode"] == "coordinated"

    # Before the first SYN: the prediction, and why.
    page.locator("#predicted-path").wait_for()
    assert page.locator("#predicted-path").inner_text() == "relay"
    why = page.locator("#prediction-why").inner_text()
    assert why.startswith("The joiner's NAT is symmetric (a new public port per destination)")
    assert "(NATs: rst × symmetric, sharer first)" in why
    # Then what happened: the short punch, then the relay, as predicted.
    page.locator("#diagnosis[data-held='true']").wait_for(timeout=20_000)
    assert page.locator("#actual-path strong").inner_text() == "relay"
    assert "as predicted" in page.locator("#actual-path").inner_text().lower()
    rows = page.locator("#timeline-table tbody tr")
    kinds = [r.strip() for r in rows.locator("td:nth-child(2)").all_inner_texts()]
    for kind in ("start", "rendezvous", "fire", "stage", "syn", "answer", "stage failed",
                 "path"):
        assert kind in kinds, kinds
    assert kinds.index("fire") < kinds.index("syn") < kinds.index("path")
    syn = page.locator("#timeline-table tr.tl-syn").first.inner_text()
    assert re.search(r"SYN #1 \(public\) to 192\.0\.2\.2:\d+, TTL default", syn), syn
    arming = page.locator("#timeline-table tr.tl-syn").nth(1).inner_text()
    assert "TTL 2" in arming, arming  # the sharer arms with a low TTL after its first shot
    assert page.locator("#timeline-table tr.tl-answer").count() >= 1
    assert "relay" in page.locator("#timeline-table tr.tl-path").inner_text()
    page.locator("#diagnostics").scroll_into_view_if_needed()
    page.locator("#diagnostics").screenshot(path=screens / "session-diagnostics.png")
    session = api(lab.a1, url_a, f"/api/sessions/{page.url.rsplit('/', 1)[1]}")
    assert session["prediction"] == {"path": "relay", "why": session["prediction"]["why"],
                                     "held": True}
    assert [m["kind"] for m in session["timeline"]][:2] == ["start", "rendezvous"]
    # Stopped, the page's live stream ends cleanly; the history keeps it all.
    page.get_by_role("button", name="Stop session").click()
    page.locator("#live .badge-stopped").wait_for()
    assert page.locator("#diagnosis[data-held='true']").count() == 1


def _statistics(page: Any, screens: Path) -> None:
    page.get_by_role("link", name="Statistics").click()
    page.wait_for_url(re.compile(r"/stats$"))
    assert page.get_by_role("heading", name="Statistics", exact=True).is_visible()
    assert "1 of 1 pairings connected; the path was the predicted one in 1" in \
        page.locator("#stats-overall").inner_text()
    by_pair = page.locator("#by-pair")
    assert by_pair.locator("svg.chart").count() == 2
    assert "rst × symmetric" in by_pair.locator("table").inner_text()
    assert "100% of 1" in by_pair.locator("svg.chart").first.inner_html()
    assert "relay" in page.locator("#by-path table").inner_text()
    page.screenshot(path=screens / "statistics.png", full_page=True)
    # Another range: htmx swaps the body in place (no navigation).
    page.evaluate("window.__stayed = true")
    with page.expect_response(lambda r: "/stats?range=1h" in r.url) as answer:
        page.get_by_label("Time range").select_option("1h")
    assert answer.value.status == 200
    page.wait_for_url(re.compile(r"/stats\?range=1h$"))
    assert page.evaluate("window.__stayed") is True
    assert page.locator("#stats-overall").is_visible()
    page.set_viewport_size(PHONE)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways at 360 px ({width} px)"
