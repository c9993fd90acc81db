"""Security middlewares: Host check, LAN access token, CSRF; and response headers.

Threat model: the dashboard controls tunnels into this machine, so a web
page in the user's own browser is the first attacker.
- DNS rebinding: a hostile name resolving to 127.0.0.1 makes the browser send
  *our* requests with *its* Host; in loopback mode only loopback names pass.
- CSRF: a cross-origin ``Origin`` (or ``Sec-Fetch-Site: cross-site``) on a
  state-changing request is refused; HTML forms also carry a token bound to
  the requester's credential. The JSON API needs ``Content-Type:
  application/json``, which no cross-origin page can send without a CORS
  preflight (never granted here).
- LAN mode (non-loopback bind): every request needs the access token, from
  ``?token=`` once (then an HttpOnly SameSite=Strict cookie, like Jupyter) or
  ``Authorization: Bearer``. A share link ``/s/<token>`` is its own
  credential and reaches only its session's routes.
"""

from __future__ import annotations

import hmac
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from multidict import MultiDictProxy

from nopf_web.inputs import InputError, one_line

from .config import WebConfig
from .keys import ACCESS, CONFIG, Access
from .render import csrf_token, render

TOKEN_COOKIE: Final = "nopf_token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def refuse(request: web.Request, status: int, message: str,
           field: str | None = None) -> web.Response:
    """An error answer in the requester's language: ``{"error", "field"}`` for the API,
    a page otherwise. ``field`` names the input at fault (by default what the status
    implies: ``id`` for an unknown session, ``body`` for one too large...)."""
    message = one_line(message)
    if _is_api(request):
        return web.json_response({"error": message, "field": field or _field_of(request, status)},
                                 status=status)
    return render(request, "error.html", status=status, title=_TITLES.get(status, "Error"),
                  message=message)


def _field_of(request: web.Request, status: int) -> str:
    if status == 404:
        match = request.match_info
        return next((name for name in ("id", "token") if name in match), "path")
    return _FIELDS.get(status, "request")


_TITLES: Final = MappingProxyType({
    400: "Bad request", 401: "Access token needed", 403: "Refused", 404: "Not found",
    405: "Not allowed", 413: "Too large", 415: "Unsupported content type"})
_FIELDS: Final = MappingProxyType({
    401: "token", 405: "method", 413: "body", 415: "Content-Type"})


async def read_form(
        request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form fields; an unreadable body (bad encoding or multipart) is an
    :class:`InputError` naming ``body``, not a server error."""
    try:
        return await request.post()
    except web.HTTPException:
        raise  # too large: 413
    except (ValueError, LookupError, AssertionError, HttpProcessingError) as exc:
        # aiohttp's form and multipart parsers: a bad charset, encoding, header...
        raise InputError("body", f"the form could not be read ({type(exc).__name__})") \
            from None


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower()


def _port(request: web.Request, config: WebConfig) -> int:
    """The port this request came in on (its Host header may be anything)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return config.port


@web.middleware
async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    if not config.lan_mode:
        name = _host_name(request.headers.get("Host", ""))
        if name not in config.allowed_hosts:
            return refuse(request, 403, f"this dashboard answers only to localhost, not to "
                          f"the host name {name!r:.80} (protection against DNS rebinding): "
                          f"open http://127.0.0.1:{_port(request, config)}/", "Host")
    return await handler(request)


def _valid(config: WebConfig, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(token.encode(),
                                                     config.access_token.encode())


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


@web.middleware
async def access_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    path = request.path
    if path.startswith("/s/"):
        # The share token in the path is the credential; the handler checks it.
        request[ACCESS] = Access(full=False, credential=f"share:{path.split('/')[2]}")
        return await handler(request)
    if path.startswith("/static/"):
        return await handler(request)
    if not config.lan_mode:
        request[ACCESS] = Access(full=True, credential="local")
        return await handler(request)
    query_token = request.query.get("token")
    if _valid(config, _bearer(request)) or _valid(config, request.cookies.get(TOKEN_COOKIE)):
        request[ACCESS] = Access(full=True, credential="lan")
        return await handler(request)
    if _valid(config, query_token):
        request[ACCESS] = Access(full=True, credential="lan")
        if _is_api(request) or request.method not in SAFE_METHODS:
            return await handler(request)
        # Trade the URL token for a cookie and drop it from the address bar.
        query = request.rel_url.query.copy()
        query.popall("token")
        resp = web.Response(status=303,
                            headers={"Location": str(request.rel_url.with_query(query))})
        resp.set_cookie(TOKEN_COOKIE, config.access_token, httponly=True, samesite="Strict",
                        path="/")
        return resp
    request[ACCESS] = Access(full=False, credential="none")
    return refuse(request, 401, "this dashboard runs in LAN mode and needs its access token: "
                  "open the URL that nopf-web printed (it ends in ?token=...), or send "
                  "Authorization: Bearer TOKEN", "token")


def _same_origin(origin: str, request: web.Request) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. an unclosed IPv6 bracket: no origin of ours
        return False
    return parts.scheme == request.scheme and parts.netloc.lower() == request.host.lower()


@web.middleware
async def csrf_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in SAFE_METHODS:
        return await handler(request)
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(origin, request):
        return refuse(request, 403, f"cross-origin request from {origin[:100]!r} refused",
                      "Origin")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return refuse(request, 403, "cross-site request refused", "Sec-Fetch-Site")
    if _is_api(request):
        if request.can_read_body and request.content_type != "application/json":
            return refuse(request, 415, "send the body as JSON with Content-Type: "
                          "application/json", "Content-Type")
        return await handler(request)
    token = request.headers.get("X-CSRF-Token")
    if token is None and request.content_type in ("application/x-www-form-urlencoded",
                                                  "multipart/form-data"):
        value = (await read_form(request)).get("csrf_token")
        token = value if isinstance(value, str) else None
    if token is None or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                                csrf_token(request).encode()):
        return refuse(request, 403, "this form has expired or did not come from this "
                      "dashboard: reload the page and try again", "csrf_token")
    return await handler(request)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors as ``{"error": ..., "field": ...}`` on the API and as a page elsewhere;
    bad input (:class:`InputError`, from any handler) is a 400 naming its field."""
    try:
        return await handler(request)
    except InputError as exc:
        return refuse(request, 400, str(exc), exc.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") \
            else (exc.reason or "error").lower()
        return refuse(request, exc.status, message)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # Share and access tokens are in URLs: no Referer to other sites. Not "no-referrer":
    # with it Chromium sends "Origin: null" on our own form posts, which the CSRF check refuses.
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")


MIDDLEWARES: Final[tuple[Middleware, ...]] = (api_errors, host_check, access_check, csrf_check)
