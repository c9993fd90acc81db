"""UPnP-IGD port mapping through async-upnp-client: find the gateway's IGD, then SOAP.

Discovery (UPnP Device Architecture 1.1 §1.3): an SSDP M-SEARCH for the
InternetGatewayDevice, multicast to 239.255.255.250:1900 from our LAN address
and unicast to the gateway's port 1900 (a unicast search is answered at once,
a multicast one after up to MX seconds). Only answers from the gateway itself
count: another IGD on the LAN cannot open ports on our default route. Then the
device description is fetched and a WANIPConnection (v2 or v1) or
WANPPPConnection v1 service is used for GetExternalIPAddress, AddPortMapping
and DeletePortMapping (IGD WANIPConnection v1 §2.4).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import aiohttp
from async_upnp_client.aiohttp import AiohttpSessionRequester
from async_upnp_client.client import UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.ssdp import SSDP_IP_V4, SSDP_PORT
from async_upnp_client.utils import CaseInsensitiveDict

from nopf_web.portmap.errors import AttemptFailed

IGD_DEVICES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
WAN_SERVICES = (  # in order of preference
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
SSDP_MX = 1  # seconds a device may wait before answering a multicast search (minimum)

# UPnP error codes of WANIPConnection (IGD v1 §2.4.16, v2 §2.5.16)
CONFLICT_IN_MAPPING_ENTRY = 718
ONLY_PERMANENT_LEASES = 725
NO_SUCH_ENTRY = 714
CONFLICT_RETRIES = 3  # other external ports tried after a 718
DYNAMIC_PORTS = (49152, 65535)  # where those are drawn from


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, UpnpActionError):
        return f"UPnP error {exc.error_code} ({exc.error_desc})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


@dataclass
class Igd:
    """The WAN connection service of the gateway's InternetGatewayDevice."""

    location: str
    service: UpnpService
    step_timeout: float

    @property
    def service_type(self) -> str:
        return self.service.service_type

    async def _call(self, action: str, what: str, **args: Any) -> Any:
        if not self.service.has_action(action):
            raise AttemptFailed(f"{self.location} has no {action} action")
        try:
            async with asyncio.timeout(self.step_timeout):
                return await self.service.action(action).async_call(**args)
        except TimeoutError:
            raise AttemptFailed(f"{what}: no answer within {self.step_timeout:g} s") from None
        except UpnpActionError:
            raise
        except (UpnpError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise AttemptFailed(f"{what}: {_error_text(exc)}") from exc

    async def external_address(self) -> IPv4Address:
        try:
            result = await self._call("GetExternalIPAddress", "GetExternalIPAddress")
        except UpnpActionError as exc:
            raise AttemptFailed(f"GetExternalIPAddress: {_error_text(exc)}") from exc
        text = result.get("NewExternalIPAddress") or ""
        try:
            return IPv4Address(text)
        except ValueError:
            raise AttemptFailed(f"GetExternalIPAddress gave {text!r}, not an IPv4 address") \
                from None

    async def add_tcp(self, external_port: int, internal_client: IPv4Address,
                      internal_port: int, lease: int, description: str) -> None:
        """AddPortMapping; raises UpnpActionError for the caller to read its code."""
        await self._call(
            "AddPortMapping", "AddPortMapping",
            NewRemoteHost="",
            NewExternalPort=external_port,
            NewProtocol="TCP",
            NewInternalPort=internal_port,
            NewInternalClient=str(internal_client),
            NewEnabled=True,
            NewPortMappingDescription=description,
            NewLeaseDuration=lease,
        )

    async def delete_tcp(self, external_port: int) -> None:
        try:
            await self._call("DeletePortMapping", "DeletePortMapping",
                             NewRemoteHost="", NewExternalPort=external_port,
                             NewProtocol="TCP")
        except UpnpActionError as exc:
            if exc.error_code == NO_SUCH_ENTRY:
                return  # already gone: what we wanted
            raise AttemptFailed(f"DeletePortMapping: {_error_text(exc)}") from exc

    async def map_tcp(self, internal_client: IPv4Address, internal_port: int,
                      suggested_port: int, lease: int, description: str,
                      rng: random.Random) -> int:
        """Add the mapping on ``suggested_port``, or on another port if that one is
        taken (718); returns the external port. Permanent-only gateways (725) are
        refused: a crash would leave their mapping behind forever."""
        port = suggested_port
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                await self.add_tcp(port, internal_client, internal_port, lease, description)
                return port
            except UpnpActionError as exc:
                if exc.error_code == CONFLICT_IN_MAPPING_ENTRY and attempt < CONFLICT_RETRIES:
                    port = rng.randint(*DYNAMIC_PORTS)
                    continue
                if exc.error_code == ONLY_PERMANENT_LEASES:
                    raise AttemptFailed("the gateway grants only permanent leases (725); "
                                        "refused, a crash would leave the mapping") from exc
                raise AttemptFailed(f"AddPortMapping: {_error_text(exc)}") from exc
        raise AssertionError("unreachable")


async def search(gateway: IPv4Address, local_address: IPv4Address, timeout: float) -> str:
    """The description URL of the gateway's IGD, by SSDP M-SEARCH within ``timeout``."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()
    others: list[str] = []

    def on_response(headers: CaseInsensitiveDict) -> None:
        st = str(headers.get_lower("st", ""))
        if not st.startswith("urn:schemas-upnp-org:device:InternetGatewayDevice:"):
            return
        host = str(headers.get_lower("_host", ""))
        location = str(headers.get_lower("location", ""))
        if host != str(gateway):
            others.append(host)
            return
        if location and not found.done():
            found.set_result(location)

    listener = SsdpSearchListener(
        callback=on_response,
        source=(str(local_address), 0),
        target=(SSDP_IP_V4, SSDP_PORT),
        timeout=SSDP_MX,
        search_target=IGD_DEVICES[1],
    )
    try:
        await listener.async_start()
        for st in IGD_DEVICES:
            listener.search_target = st
            listener.async_search()
            listener.async_search(override_target=(str(gateway), SSDP_PORT))
        async with asyncio.timeout(timeout):
            return await found
    except TimeoutError:
        extra = f" (IGDs answered from {', '.join(sorted(set(others)))})" if others else ""
        raise AttemptFailed(
            f"no SSDP answer from {gateway} within {timeout * 1000:.0f} ms{extra}"
        ) from None
    except OSError as exc:
        raise AttemptFailed(f"SSDP search failed: {exc.strerror or exc}") from exc
    finally:
        listener.async_stop()


async def describe(location: str, session: aiohttp.ClientSession, step_timeout: float) -> Igd:
    """Fetch the device description and pick its WAN connection service."""
    requester = AiohttpSessionRequester(session, timeout=max(1, round(step_timeout)))
    factory = UpnpFactory(requester, non_strict=True)
    try:
        async with asyncio.timeout(step_timeout):
            device = await factory.async_create_device(location)
    except TimeoutError:
        raise AttemptFailed(
            f"device description {location}: no answer within {step_timeout:g} s") from None
    except (UpnpError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise AttemptFailed(f"device description {location}: {_error_text(exc)}") from exc
    for service_type in WAN_SERVICES:
        service = device.find_service(service_type)
        if service is not None:
            return Igd(location, service, step_timeout)
    raise AttemptFailed(f"{location} has no WANIPConnection or WANPPPConnection service")
