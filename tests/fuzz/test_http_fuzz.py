"""The dashboard's HTTP surfaces, fuzzed against the real app (aiohttp's test server).

Every route gets hostile JSON bodies, form fields, query strings and headers.
The property: never a 5xx; on ``/api/`` every 4xx is a JSON object with
``error`` and ``field`` (strings); pages answer 4xx with an HTML page.

Inputs the app accepts are let through only when they stay on this machine: an
accepted rendezvous or peer address that is not loopback (or a host name,
which would be resolved) is skipped rather than sent, and the NAT doctor is
asked to measure only in its own tests, so a fuzz run never sends a packet
beyond loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import assume, event, example, given, strategies as st

from nopf_web.guard.base import NullGuard
from nopf_web.inputs import InputError
from nopf_web.web import create_app
from nopf_web.web.app import MAX_BODY
from nopf_web.web.keys import SECRET
from nopf_web.wire.address import parse_host_endpoint
from tests.e2e.web_support import web_config
from tests.fuzz.budget import fuzz, json_values, nasty_text, raw_bodies
from tests.programs import free_port


@dataclass
class Dashboard:
    loop: asyncio.AbstractEventLoop
    client: TestClient[Any, Any]
    csrf: str
    live_id: str  # a seed server session waiting for its peer's address
    ended_id: str  # a stopped session (its live stream ends at once)
    share: str  # the live session's share token

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-web")
    loop = asyncio.new_event_loop()
    app = create_app(web_config(tmp, max_live_sessions=8), guard=NullGuard("fuzz"))
    client: TestClient[Any, Any] = TestClient(TestServer(app), loop=loop)
    loop.run_until_complete(client.start_server())

    async def make(mode: str) -> dict[str, Any]:
        resp = await client.post("/api/sessions", json={"role": "server", "mode": mode,
                                                        "local_port": free_port()})
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())

    live = loop.run_until_complete(make("seed"))
    ended = loop.run_until_complete(make("seed"))
    loop.run_until_complete(client.delete(f"/api/sessions/{ended['id']}"))
    csrf = hmac.new(app[SECRET], b"local", hashlib.sha256).hexdigest()
    share = str(live["share_url"]).rsplit("/", 1)[1]
    try:
        yield Dashboard(loop, client, csrf, live["id"], ended["id"], share)
    finally:
        loop.run_until_complete(client.close())
        loop.close()


def stays_local(value: object) -> bool:
    """False for an address the app would accept and then reach beyond loopback (each
    of a list, or of comma-separated text: local_port takes several)."""
    if isinstance(value, list):
        return all(stays_local(item) for item in value)
    if not isinstance(value, str):
        return True
    if "," in value:
        return all(stays_local(part) for part in value.split(","))
    try:
        host, _port = parse_host_endpoint(value)
    except InputError:
        return True  # refused: nothing is reached
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it would be resolved


async def check(resp: ClientResponse, api: bool) -> None:
    body = await resp.read()
    event(f"HTTP {resp.status}")  # --hypothesis-show-statistics: how deep the inputs got
    assert resp.status < 500, (resp.status, body[:300])
    if resp.status >= 400 and api:
        data = json.loads(body)
        assert isinstance(data.get("error"), str) and data["error"], data
        assert isinstance(data.get("field"), str) and data["field"], data


CONTENT_TYPES = st.one_of(
    st.just("application/json"), st.just("application/json; charset=utf-8"),
    st.sampled_from(["application/json; charset=latin-1", "application/json; charset=bogus",
                     "application/json; charset=utf-16", "application/json;;;",
                     "application/json; boundary=\"", "text/plain", "", "multipart/form-data",
                     "application/x-www-form-urlencoded; charset=nope"]),
)
# What the JSON API's create takes, each field sometimes hostile, sometimes valid.
SESSION_BODIES = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["server", "client"]), nasty_text, json_values),
    "local_port": st.one_of(st.integers(), st.integers(min_value=1, max_value=65535),
                            nasty_text, json_values,
                            # several services: a JSON list, or comma-separated text
                            st.lists(st.one_of(st.integers(min_value=1, max_value=65535),
                                               nasty_text), max_size=18),
                            st.lists(st.integers(min_value=1, max_value=65535), max_size=3)
                            .map(lambda ports: ", ".join(map(str, ports)))),
    "mode": st.one_of(st.sampled_from(["coordinated", "seed"]), nasty_text, json_values),
    "code": st.one_of(st.just("7-orbit-lantern"), nasty_text, json_values),
    "rendezvous": st.one_of(st.just("127.0.0.1:9"), nasty_text, json_values),
    "label": st.one_of(nasty_text, json_values),
}).flatmap(lambda d: st.one_of(st.just(d), st.dictionaries(nasty_text, json_values,
                                                            max_size=3).map(lambda x: {**d, **x})))
# A valid body with one field hostile (or missing): reaches the checks behind the first.
VALID_BODY = {"role": "server", "local_port": 4000, "mode": "coordinated", "label": "fuzz"}
ONE_BAD_FIELD = st.tuples(st.sampled_from([*sorted(VALID_BODY), "code", "rendezvous"]),
                          st.one_of(nasty_text, json_values), st.booleans()).map(
    lambda t: {k: v for k, v in {**VALID_BODY, t[0]: t[1]}.items() if t[2] or k != t[0]})


@fuzz(ci=250)
@given(route=st.sampled_from(["create", "peer", "peer-ended", "get", "delete-unknown"]),
       body=st.one_of(ONE_BAD_FIELD.map(lambda d: json.dumps(d).encode("utf-8",
                                                                       "surrogatepass")),
                      SESSION_BODIES.map(lambda d: json.dumps(d).encode("utf-8",
                                                                        "surrogatepass")),
                      st.fixed_dictionaries({"address": st.one_of(nasty_text, json_values)})
                      .map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass")),
                      raw_bodies),
       content_type=CONTENT_TYPES)
@example(route="create", body=b'{"role":"server","local_port":"\\u00b2"}',
         content_type="application/json").via("the issue")
@example(route="peer", body=b'{"address":"1.2.3.4:\\u00b2"}',
         content_type="application/json").via("the issue")
@example(route="create", body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")
@example(route="create", body=b'{"role":"server","local_port":22}',
         content_type="application/json; charset=bogus")
def test_json_api(dash: Dashboard, route: str, body: bytes, content_type: str) -> None:
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        decoded = None
    if isinstance(decoded, dict):
        # A server session's service HOST:PORT is reached only by a stream, which no fuzzed
        # session gets; kept local all the same, as the rule for tests says.
        assume(all(stays_local(decoded.get(k)) for k in ("rendezvous", "address", "local_port")))
    target = {"create": ("POST", "/api/sessions"),
              "peer": ("POST", f"/api/sessions/{dash.live_id}/peer"),
              "peer-ended": ("POST", f"/api/sessions/{dash.ended_id}/peer"),
              "get": ("GET", f"/api/sessions/{dash.live_id}"),
              "delete-unknown": ("DELETE", "/api/sessions/0123456789ab")}[route]
    headers = {"Content-Type": content_type} if content_type else {}

    async def go() -> None:
        async with dash.client.request(target[0], target[1], data=body, headers=headers) as resp:
            await check(resp, api=True)
            created = await resp.json() if resp.status == 201 else None
        if created is not None:  # keep room for the next ones
            async with dash.client.delete(f"/api/sessions/{created['id']}") as resp:
                assert resp.status == 200 and (await resp.json())["outcome"] == "stopped"
    dash.run(go())


QUERY_ROUTES = ("/api/history", "/api/sessions", "/api/guard", "/history", "/history.csv",
                "/history.json", "/settings", "/", "/doctor", "/api/doctor", "/stats",
                "/history/delete")  # the page that asks (a GET deletes nothing)
QUERY_NAMES = ("limit", "offset", "outcome", "q", "page", "seen", "saved", "refresh", "since",
               "token", "range", "deleted", "again")


@fuzz(ci=250)
@given(route=st.sampled_from(QUERY_ROUTES), params=st.lists(st.tuples(
    st.one_of(st.sampled_from(QUERY_NAMES), nasty_text), nasty_text), max_size=4),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
@example(route="/api/history", params=[("limit", "²")], raw=None).via("the issue")
@example(route="/history", params=[("page", "²")], raw=None).via("the issue")
@example(route="/api/history", params=[], raw=b"limit=%ff%fe&offset=%")
@example(route="/stats", params=[("range", "\ud800")], raw=None)
def test_query_strings(dash: Dashboard, route: str, params: list[tuple[str, str]],
                       raw: bytes | None) -> None:
    # The doctor measures (and probes the gateway) only in its own tests: fuzz its
    # parameter, never ask it to run.
    assume(not (route in ("/doctor", "/api/doctor") and raw is None and all(
        v in ("0", "1") for k, v in params if k == "refresh")))
    if raw is not None:
        if route in ("/doctor", "/api/doctor"):
            raw = b"refresh=bad&" + raw
        path = route + "?" + raw.decode("latin-1").replace("#", "%23").replace(" ", "%20")
        query: Any = None
    else:
        path, query = route, [(k.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                              v.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
                             for k, v in params]

    async def go() -> None:
        try:
            ctx = dash.client.get(path, params=query)
            async with ctx as resp:
                await check(resp, api=route.startswith("/api/"))
        except ValueError:  # the client itself refuses to send this URL
            return
    dash.run(go())


FORM_ROUTES = ("/sessions", "/sessions/{live}/peer", "/sessions/{ended}/peer", "/settings",
               "/s/{share}/peer", "/sessions/0123456789ab/stop", "/history/delete",
               "/sessions/{live}/delete")
FORM_FIELDS = ("role", "local_port", "mode", "code", "rendezvous", "label", "address",
               "default_rendezvous", "csrf_token", "outcome", "q")


@fuzz(ci=250)
@given(route=st.sampled_from(FORM_ROUTES),
       fields=st.dictionaries(st.one_of(st.sampled_from(FORM_FIELDS), nasty_text),
                              st.one_of(nasty_text, st.sampled_from(["server", "client", "seed",
                                                                     "coordinated"])),
                              max_size=5),
       with_token=st.booleans(), multipart=st.booleans(),
       raw=st.one_of(st.none(), st.binary(max_size=120)), content_type=CONTENT_TYPES)
@example(route="/sessions", fields={"role": "server", "local_port": "²"}, with_token=True,
         multipart=False, raw=None, content_type="").via("the issue")
@example(route="/settings", fields={}, with_token=True, multipart=False,
         raw=b"default_rendezvous=%ff&csrf_token=x",
         content_type="application/x-www-form-urlencoded; charset=nope")
def test_forms(dash: Dashboard, route: str, fields: dict[str, str], with_token: bool,
               multipart: bool, raw: bytes | None, content_type: str) -> None:
    assume(all(stays_local(fields.get(k)) for k in ("rendezvous", "address", "local_port",
                                                    "default_rendezvous")))
    # An accepted empty default rendezvous means "the embedded one": also local.
    path = route.format(live=dash.live_id, ended=dash.ended_id, share=dash.share)
    headers: dict[str, str] = {}
    data: Any
    if raw is not None:
        data, headers["Content-Type"] = raw, content_type or "application/x-www-form-urlencoded"
        headers["X-CSRF-Token"] = dash.csrf if with_token else "nope"
    else:
        pairs = [(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass"))
                 for k, v in fields.items()]
        if with_token:
            pairs.append((b"csrf_token", dash.csrf.encode()))
        if multipart:  # by hand: names and values as raw as they come
            parts = [b'--fuzz\r\nContent-Disposition: form-data; name="' + k + b'"\r\n\r\n' + v
                     + b"\r\n" for k, v in pairs]
            parts.append(b'--fuzz\r\nContent-Disposition: form-data; name="file"; '
                         b'filename="x.bin"\r\n\r\n\x00\xff\r\n')
            data = b"".join(parts) + b"--fuzz--\r\n"
            headers["Content-Type"] = "multipart/form-data; boundary=fuzz"
        else:
            data = urlencode(pairs).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"

    async def go() -> None:
        async with dash.client.post(path, data=data, headers=headers,
                                    allow_redirects=False) as resp:
            await check(resp, api=False)
    dash.run(go())


async def raw_exchange(dash: Dashboard, request: bytes) -> tuple[int | None, bytes, bytes]:
    """Send ``request`` as is; (status or None, head, body) of what comes back before the
    server closes (Connection: close) or 5 s pass."""
    server = dash.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        writer.write_eof()
        try:
            async with asyncio.timeout(5):
                data = await reader.read()
        except TimeoutError:
            data = b""  # an incomplete request: the server still waits, and that is fine
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return None, head, body
    return int(head.split()[1]), head, body


def _header(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")


@fuzz(ci=150)
@given(host=st.one_of(nasty_text, st.sampled_from(["[::1", "a b", "localhost:99999", "[", ":",
                                                   "127.0.0.1:x", "evil.example"])),
       origin=st.one_of(st.none(), nasty_text, st.just("http://[::1")),
       route=st.sampled_from(["/api/sessions", "/", "/history"]), method=st.sampled_from(
           ["GET", "POST", "DELETE", "PUT", "PATCH"]))
@example(host="[::1", origin="http://[::1", route="/", method="POST")
@example(host="\x08", origin=None, route="/api/sessions", method="GET")
def test_headers(dash: Dashboard, host: str, origin: str | None, route: str,
                 method: str) -> None:
    """Host and Origin as any bytes a client can send (the DNS-rebinding and CSRF checks
    read them): an answer below 500, JSON naming a field on the API."""
    request = (method.encode() + b" " + route.encode() + b" HTTP/1.1\r\nHost: " + _header(host)
               + b"\r\n")
    if origin is not None:
        request += b"Origin: " + _header(origin) + b"\r\n"
    request += (b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\n{}")
    status, head, body = dash.run(raw_exchange(dash, request))
    if status is None:
        return  # the parser closed without an answer
    assert status < 500, (request, head)
    if status >= 400 and route.startswith("/api/") and b"application/json" in head:
        data = json.loads(body)
        assert data["error"] and data["field"], data


@fuzz(ci=100)
@given(request=st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([b"GET", b"POST", b"DELETE", b"X"]),
              st.binary(max_size=40), st.binary(max_size=80)).map(
        lambda t: t[0] + b" /" + t[1] + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + t[2]
        + b"\r\nConnection: close\r\n\r\n")))
def test_raw_requests(dash: Dashboard, request: bytes) -> None:
    """Bytes straight to the socket: aiohttp's parser answers 4xx or closes; never 5xx."""
    status, head, _body = dash.run(raw_exchange(dash, request))
    assert status is None or status < 500, (request, head)


def test_oversized_bodies_are_413_with_a_field(dash: Dashboard) -> None:
    async def go() -> None:
        big = b'{"label": "' + b"x" * (MAX_BODY + 1) + b'"}'
        async with dash.client.post("/api/sessions", data=big,
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["field"] == "body"
        form = "csrf_token=" + dash.csrf + "&label=" + "x" * (MAX_BODY + 1)
        async with dash.client.post("/sessions", data=form.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded"}) as resp:
            assert resp.status == 413
    dash.run(go())
