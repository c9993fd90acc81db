"""The NAT doctor: what kind of NAT this machine is behind, measured against a rendezvous.

``await run_doctor(Endpoint(host, port))`` returns a :class:`DoctorReport`
(see :mod:`nopf_web.doctor.report` for its JSON); :class:`DoctorCache` shares
one measurement between concurrent askers and keeps it for a minute. The
server side is :mod:`nopf_web.rendezvous.doctor`; the wire format is
:mod:`nopf_web.wire.doctor`.
"""

from nopf_web.doctor.probe import DEFAULT_BUDGET, detect_gateway, run_doctor
from nopf_web.doctor.report import (
    FILTERINGS,
    NAT_MAPPINGS,
    DoctorReport,
    Filtering,
    NatMapping,
    ReportError,
)

__all__ = [
    "DEFAULT_BUDGET",
    "FILTERINGS",
    "NAT_MAPPINGS",
    "DoctorReport",
    "Filtering",
    "NatMapping",
    "ReportError",
    "detect_gateway",
    "run_doctor",
]
