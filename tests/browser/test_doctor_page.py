"""The Doctor page in a real browser, behind a real NAT.

A real ``nopf-web`` runs on a1, behind the lab's ``rst`` NAT with a hairpinning
gateway that also answers NAT-PMP, PCP and UPnP-IGD, against a real nopf-server
on rdv (its doctor on the second address too). Playwright's driver, and the
Debian chromium it starts, are started from a thread inside a1's namespace, so
the browser reaches the dashboard on a1's loopback as a person at that machine
would. Screenshots at desktop and 360 px width go to $NOPF_SCREENSHOT_DIR
(default: the test's temp directory).

Skipped when chromium or playwright is missing, or labs cannot be built, except
under CI=true, where that is a failure.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.peers import start_doctor_server
from tests.lab import gateway as lab_gateway
from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, Lab
from tests.programs import argv

from .support import PHONE, page_in, require_browser, screens_dir

pytestmark = [pytest.mark.browser, pytest.mark.lab]


@pytest.fixture
def lab_dashboard(lab_factory: LabFactory, tmp_path: Path) -> Iterator[tuple[Lab, str]]:
    """A lab, nopf-server on rdv, a gateway on nata and nopf-web on a1; yields its URL."""
    require_browser()
    lab = lab_factory("rst", "drop", delay_ms=10, rdv_second_ip=True, hairpin=("a",))
    start_doctor_server(lab)
    lab_gateway.start(lab.nata)
    proc = lab.a1.popen(argv("nopf-web", "--port", "0", "--db", str(tmp_path / "h.sqlite3"),
                             "--rendezvous", f"{RDV_IP}:3012", "--no-guard"),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield lab, url


def test_the_doctor_page_reports_the_nat_and_measures_again(
        lab_dashboard: tuple[Lab, str], tmp_path: Path) -> None:
    lab, url = lab_dashboard
    screens = screens_dir(tmp_path)
    with page_in(lab.a1) as page:  # the driver and chromium start in a1
        _check_page(page, url, screens)


def _check_page(page: Any, url: str, screens: Path) -> None:
    page.goto(url)
    page.get_by_role("link", name="Doctor").click()
    page.wait_for_url(re.compile(r"/doctor$"))
    assert page.get_by_role("heading", name="NAT doctor").is_visible()
    summary = page.locator("#doctor-summary")
    assert "you can share with anyone except peers behind symmetric NATs" in \
        summary.inner_text()
    assert "verdict-ok" in (summary.get_attribute("class") or "")
    facts = {key: page.locator(f"#doctor-{key} dd").inner_text()
             for key in ("public-address", "mapping", "filtering", "hairpin", "port-mapping",
                         "cgnat", "ipv6")}
    assert facts["public-address"].startswith("203.0.113.2:")
    assert facts["mapping"].startswith("endpoint-independent")
    assert facts["filtering"].startswith("rst: ")
    assert facts["hairpin"].startswith("yes")
    assert facts["port-mapping"].startswith("UPnP-IGD, NAT-PMP, PCP answer on your gateway")
    assert facts["cgnat"] == "no"
    assert facts["ipv6"].startswith("no: ")
    page.screenshot(path=screens / "doctor-desktop.png", full_page=True)

    # Loaded again, the page shows the kept report and its age; Measure again swaps a
    # fresh one in place (htmx: no navigation).
    page.reload()
    assert re.search(r", \d+ s ago\.", page.locator("#doctor-when").inner_text())
    page.evaluate("window.__stayed = true")
    with page.expect_response(lambda r: r.url.endswith("/doctor") and
                              r.request.method == "POST") as answer:
        page.get_by_role("button", name="Measure again").click()
    assert answer.value.status == 200
    page.wait_for_function("() => !document.querySelector('form.again button').disabled")
    assert page.evaluate("window.__stayed") is True
    assert " ago" not in page.locator("#doctor-when").inner_text()  # just measured
    assert page.locator("#doctor-mapping dd").inner_text().startswith("endpoint-independent")

    page.set_viewport_size(PHONE)
    page.screenshot(path=screens / "doctor-360.png", full_page=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways at 360 px ({width} px)"
