"""Network-namespace lab: a small routed internet with NATs, for hole-punching tests.

Stdlib only. See :mod:`tests.lab.topology` for the topology and API,
:mod:`tests.lab.delayer` for the NFQUEUE delay/loss emulator,
``python -m tests.lab --help`` for the command line and
:mod:`tests.lab.fixtures` for the pytest integration.
"""

from tests.lab.topology import (
    MODES,
    REBIND_KEYS,
    Host,
    Lab,
    LabError,
    Nat,
    Site,
    TcpCounter,
    cleanup_prefix,
    cleanup_stale,
    lab_unavailable_reason,
    list_labs,
)

__all__ = [
    "MODES",
    "REBIND_KEYS",
    "Host",
    "Lab",
    "LabError",
    "Nat",
    "Site",
    "TcpCounter",
    "cleanup_prefix",
    "cleanup_stale",
    "lab_unavailable_reason",
    "list_labs",
]
