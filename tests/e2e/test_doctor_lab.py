"""The NAT doctor in the lab: a real nopf-server (rendezvous and doctor responder) on
``rdv`` with its second address, the doctor on ``a1`` behind each kind of NAT, 10 ms of
delay per pass through the internet router (20 ms round trips).

Each kind is measured three times and must be right every time within 1.5 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from nopf_web.doctor import DoctorReport, run_doctor
from nopf_web.wire.address import Endpoint
from tests.lab import gateway as lab_gateway
from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, Lab
from tests.programs import argv

from .peers import DOCTOR_DELAY_MS, DOCTOR_TARGET_MS, start_doctor_server

pytestmark = pytest.mark.lab

T = TypeVar("T")
RDV = Endpoint(RDV_IP, 3012)
RUNS = 3
PUBLIC_A = "203.0.113.2"

# mode, hairpin -> mapping, filtering, hairpin
EXPECTED = {
    ("none", False): ("none", "open", True),
    ("drop", False): ("endpoint-independent", "drop", False),
    ("rst", False): ("endpoint-independent", "rst", False),
    ("icmp", False): ("endpoint-independent", "icmp", False),
    ("symmetric", False): ("address-and-port-dependent", "drop", False),
    ("drop", True): ("endpoint-independent", "drop", True),
    ("symmetric", True): ("address-and-port-dependent", "drop", True),
}


def doctor_runs(lab: Lab, runs: int = RUNS) -> list[DoctorReport]:
    async def main() -> list[DoctorReport]:
        return [await run_doctor(RDV) for _ in range(runs)]
    return lab.a1.run_async(main)


@pytest.fixture
def lab_with_server(lab_factory: LabFactory) -> Iterator[Callable[..., Lab]]:
    def make(mode: str, hairpin: bool = False, *server_args: str) -> Lab:
        lab = lab_factory(mode, "drop", delay_ms=DOCTOR_DELAY_MS, rdv_second_ip=True,
                          hairpin=("a",) if hairpin else ())
        start_doctor_server(lab, *server_args)
        return lab
    yield make


@pytest.mark.parametrize(("mode", "hairpin"), list(EXPECTED),
                         ids=[f"{m}{'-hairpin' if h else ''}" for m, h in EXPECTED])
def test_each_nat_kind_is_measured_right_every_time_within_the_target(
        lab_with_server: Callable[..., Lab], mode: str, hairpin: bool) -> None:
    lab = lab_with_server(mode, hairpin)
    mapping, filtering, hairpins = EXPECTED[(mode, hairpin)]
    for report in doctor_runs(lab):
        got = (report.mapping, report.filtering, report.hairpin)
        assert got == (mapping, filtering, hairpins), report.to_json()
        assert report.elapsed_ms <= DOCTOR_TARGET_MS, report.to_json()
        assert report.mapping_by == ("port", "address")
        public = lab.a1.ip if mode == "none" else PUBLIC_A
        assert report.public_address is not None
        assert report.public_address.startswith(f"{public}:")
        assert report.local_address is not None
        assert report.local_address.startswith(f"{lab.a1.ip}:")
        preserved = report.local_address.split(":")[1] == report.public_address.split(":")[1]
        assert report.port_preserved is preserved is (mode != "symmetric")
        assert report.port_mapping == ()  # nothing answers on these NATs
        assert report.cgnat is (False if mode == "none" else None)
        assert report.ipv6 is False and "IPv4 address" in (report.reason("ipv6") or "")
        assert report.rtt_ms is not None
        assert 2 * DOCTOR_DELAY_MS <= report.rtt_ms < 10 * DOCTOR_DELAY_MS
        if filtering == "icmp":
            assert report.icmp is not None
            assert (report.icmp.type, report.icmp.code) == (3, 13)  # admin-prohibited
            assert report.icmp.source == PUBLIC_A


def test_port_mapping_protocols_are_detected_and_an_honest_gateway_is_no_cgnat(
        lab_with_server: Callable[..., Lab]) -> None:
    lab = lab_with_server("drop")
    lab_gateway.start(lab.nata)
    [report] = doctor_runs(lab, 1)
    assert report.port_mapping == ("UPnP-IGD", "NAT-PMP", "PCP")
    assert report.gateway_address == PUBLIC_A
    assert report.cgnat is False
    assert report.elapsed_ms <= DOCTOR_TARGET_MS


@pytest.mark.parametrize("external", ["100.64.7.7", "192.0.2.77"])
def test_a_gateway_whose_external_address_is_not_ours_flags_cgnat(
        lab_with_server: Callable[..., Lab], external: str) -> None:
    lab = lab_with_server("rst")
    lab_gateway.start(lab.nata, off=["upnp"], external_ip=external)
    [report] = doctor_runs(lab, 1)
    assert report.port_mapping == ("NAT-PMP", "PCP")
    assert report.gateway_address == external
    assert report.cgnat is True
    assert f"your gateway's external address is {external}" in (report.reason("cgnat") or "")
    assert "carrier-grade NAT" in report.summary()


def test_a_rendezvous_without_doctor_gives_a_report_that_says_what_is_missing(
        lab_with_server: Callable[..., Lab]) -> None:
    lab = lab_with_server("drop", False, "--no-doctor")
    [report] = doctor_runs(lab, 1)
    assert report.public_address is not None and report.public_address.startswith(PUBLIC_A)
    assert report.mapping is None and report.filtering is None
    assert "no NAT doctor at 198.51.100.2:3013 (connection refused)" in (
        report.reason("mapping") or "")
    assert report.hairpin is False and report.port_mapping == ()
    assert report.elapsed_ms <= DOCTOR_TARGET_MS


def test_cli_json_and_text_in_the_lab(lab_with_server: Callable[..., Lab]) -> None:
    lab = lab_with_server("icmp")
    out = lab.a1.run(argv("nopf", "doctor", "-a", f"{RDV_IP}:3012", "--json"), check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 1 and out.stderr == b""
    obj = json.loads(lines[0])
    for key in ("mapping", "filtering", "hairpin", "port_mapping", "cgnat", "ipv6",
                "public_address", "elapsed_ms"):
        assert key in obj
    assert (obj["mapping"], obj["filtering"], obj["hairpin"]) == (
        "endpoint-independent", "icmp", False)
    assert obj["icmp"] == {"type": 3, "code": 13, "from": PUBLIC_A}
    assert DoctorReport.from_json(obj).mapping == "endpoint-independent"

    out = lab.a1.run(argv("nopf", "doctor", "-a", f"{RDV_IP}:3012"), check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.startswith(f"nopf doctor: measured against {RDV_IP}:3012 in ")
    assert "you can share with anyone except peers behind symmetric NATs" in text
    for label in ("Public address", "Mapping", "Filtering", "Hairpin", "Port mapping",
                  "Carrier-grade NAT", "IPv6"):
        assert f"  {label}" in text
    assert "icmp: unsolicited connections are refused with an ICMP error (type 3, code 13, " \
        f"from {PUBLIC_A})" in text


def test_cli_without_a_rendezvous_is_one_line_and_exit_1(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    out = lab.a1.run(argv("nopf", "doctor", "-a", f"{RDV_IP}:3012", "--json"), check=False)
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr.decode() == f"nopf doctor: error: rendezvous {RDV_IP}:3012: connection " \
        "refused\n"


def test_cli_with_a_symmetric_nat_says_so(lab_with_server: Callable[..., Lab]) -> None:
    lab = lab_with_server("symmetric")
    out = lab.a1.run(argv("nopf", "doctor", "-a", f"{RDV_IP}:3012"), check=False)
    assert out.returncode == 0, out.stderr
    assert "Behind a symmetric NAT: direct connections only to peers without NAT; otherwise " \
        "nopf will relay." in out.stdout.decode()
