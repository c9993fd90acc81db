"""Port mapping on the home gateway: NAT-PMP (RFC 6886), PCP (RFC 6887), UPnP-IGD.

See ``docs/portmap.md``. The API is :class:`PortMapper` and its :class:`Mapping`.
"""

from nopf_web.portmap.client import (
    Detection,
    Mapping,
    MapProtocol,
    PortMapper,
    Probe,
    default_gateway,
    is_cgnat,
    local_address_towards,
    unusable_reason,
    usable,
)
from nopf_web.portmap.errors import (
    AlreadyMappedError,
    AttemptFailed,
    NoGatewayError,
    PortMapError,
)

__all__ = [
    "AlreadyMappedError",
    "AttemptFailed",
    "Detection",
    "MapProtocol",
    "Mapping",
    "NoGatewayError",
    "PortMapError",
    "PortMapper",
    "Probe",
    "default_gateway",
    "is_cgnat",
    "local_address_towards",
    "unusable_reason",
    "usable",
]
