"""Two dashboards in two NATed namespaces, driven through the JSON API, data checked by hash.

nopf-server runs in the lab's rdv host; one nopf-web runs in a1 (behind NAT
a) and one in b1 (behind NAT b), each on loopback inside its namespace, as a
user would run it. The test talks to each dashboard from inside that
namespace (``Host.enter()``), creates a server session on a1 and a client
session on b1, and moves random data both ways through the tunnel to a
service on a1: in seed mode (the two exchange their public addresses) and in
coordinated mode (the client joins with the server session's pairing code,
and several connections share the encrypted tunnel).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory

from .peers import RDV, connect, listening
from .web_lab import Dashboard, both_connected, ended, join, share, two_dashboards

pytestmark = pytest.mark.lab

UPLOAD = 4 * 1024 * 1024  # client application -> service on a1
DOWNLOAD = 2 * 1024 * 1024  # service -> client application


def serve_once(listener: socket.socket, result: dict[str, str]) -> threading.Thread:
    """Accept one connection: hash all it sends until EOF, then send DOWNLOAD random bytes."""

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            digest = hashlib.sha256()
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
            result["received"] = digest.hexdigest()
            reply = os.urandom(DOWNLOAD)
            result["sent"] = hashlib.sha256(reply).hexdigest()
            conn.sendall(reply)

    thread = threading.Thread(target=run, name="lab-service", daemon=True)
    thread.start()
    return thread


def test_two_dashboards_behind_two_nats_move_data_verified_by_hash(
        lab_factory: LabFactory, dashboards: list[Dashboard], tmp_path: Path) -> None:
    lab = lab_factory("drop", "drop")
    dash_a, dash_b = two_dashboards(lab, tmp_path, dashboards)

    with listening(lab.a1, 3000) as service:
        result: dict[str, str] = {}
        served = serve_once(service, result)
        server = dash_a.call("POST", "/api/sessions",
                             {"role": "server", "local_port": 3000, "label": "lab server",
                              "mode": "seed"})
        client = dash_b.call("POST", "/api/sessions",
                             {"role": "client", "local_port": 3010, "label": "lab client",
                              "mode": "seed"})
        assert server["rendezvous"] == client["rendezvous"] == RDV

        def has_public(d: dict[str, Any]) -> bool:
            return d["public_address"] is not None

        server = dash_a.wait(server["id"], "public address", has_public)
        client = dash_b.wait(client["id"], "public address", has_public)
        # Each dashboard sees itself as its NAT's WAN address, not its private one.
        assert server["public_address"].split(":")[0] == lab.site("a").public_ip
        assert client["public_address"].split(":")[0] == lab.site("b").public_ip

        dash_a.call("POST", f"/api/sessions/{server['id']}/peer",
                    {"address": client["public_address"]})
        dash_b.call("POST", f"/api/sessions/{client['id']}/peer",
                    {"address": server["public_address"]})
        both_connected(dash_a, server, dash_b, client)

        upload = os.urandom(UPLOAD)
        app = connect(lab.b1, 3010, timeout=30)
        with app:
            app.sendall(upload)
            app.shutdown(socket.SHUT_WR)  # half-close: the service sees EOF, then replies
            digest = hashlib.sha256()
            while chunk := app.recv(1 << 16):
                digest.update(chunk)
        served.join(30)
        assert result["received"] == hashlib.sha256(upload).hexdigest()
        assert digest.hexdigest() == result["sent"]

    server = dash_a.wait(server["id"], "end", ended)
    client = dash_b.wait(client["id"], "end", ended)
    assert (client["outcome"], server["outcome"]) == ("closed", "closed"), (client, server)
    assert (client["bytes_out"], client["bytes_in"]) == (UPLOAD, DOWNLOAD)
    assert (server["bytes_in"], server["bytes_out"]) == (UPLOAD, DOWNLOAD)
    history = dash_b.call("GET", "/api/history?limit=5")["sessions"]
    assert history[0]["id"] == client["id"]
    assert history[0]["connections"][0]["bytes_out"] == UPLOAD


def serve_digests(listener: socket.socket, count: int) -> threading.Thread:
    """Accept ``count`` connections; answer each, after its EOF, with the sha256 of its bytes."""

    def one(conn: socket.socket) -> None:
        with conn:
            digest = hashlib.sha256()
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
            conn.sendall(digest.digest())

    def run() -> None:
        for _ in range(count):
            conn, _ = listener.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=run, name="lab-digests", daemon=True)
    thread.start()
    return thread


def digest_exchange(host: Host, size: int) -> bool:
    """``size`` random bytes and EOF into the tunnel at ``host``:3010; whether the reply is
    their sha256 (from ``serve_digests`` at the other end)."""
    payload = os.urandom(size)
    with connect(host, 3010, timeout=30) as app:
        app.sendall(payload)
        app.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := app.recv(64):
            reply += chunk
    return reply == hashlib.sha256(payload).digest()


def concurrent_exchanges(host: Host, streams: int, size: int) -> bool:
    """``streams`` digest exchanges of ``size`` bytes at once; whether every reply was right."""
    with ThreadPoolExecutor(streams) as pool:
        return all(pool.map(digest_exchange, [host] * streams, [size] * streams))


@contextlib.contextmanager
def sharing_digests(lab: Lab, tmp_path: Path, dashboards: list[Dashboard], streams: int,
                    share_body: dict[str, Any], join_body: dict[str, Any] | None = None,
                    ) -> Iterator[tuple[Dashboard, dict[str, Any], Dashboard, dict[str, Any]]]:
    """Dashboards in a1 and b1; a1 shares a digest service (``serve_digests`` on port 3000,
    for ``streams`` connections) and b1 joins with the code on port 3010 (the sessions
    created with ``share_body`` and ``join_body``): each dashboard and its session once
    both are connected. The service closes on exit."""
    dash_a, dash_b = two_dashboards(lab, tmp_path, dashboards)
    with listening(lab.a1, 3000) as service:
        serve_digests(service, streams)
        server = share(dash_a, local_port=3000, **share_body)
        client = join(dash_b, server["code"], local_port=3010, **(join_body or {}))
        server, client = both_connected(dash_a, server, dash_b, client)
        yield dash_a, server, dash_b, client


def test_two_dashboards_pair_by_code_behind_two_nats(
        lab_factory: LabFactory, dashboards: list[Dashboard], tmp_path: Path) -> None:
    streams, size = 6, 512 * 1024
    lab = lab_factory("drop", "rst")
    with sharing_digests(lab, tmp_path, dashboards, streams, {"label": "lab share"},
                         {"label": "lab join"}) as (dash_a, server, dash_b, client):
        assert server["mode"] == "coordinated"  # the default
        code = server["code"]
        assert server["path"] == client["path"] == "public"
        assert client["peer_address"].split(":")[0] == lab.site("a").public_ip

        assert concurrent_exchanges(lab.b1, streams, size)

        def counted(d: dict[str, Any]) -> bool:
            return bool(d["bytes_out"] == streams * size and d["connections"] == streams)

        client = dash_b.wait(client["id"], "bytes counted", counted)
        assert client["bytes_in"] == streams * 32
        dash_b.call("DELETE", f"/api/sessions/{client['id']}")

    server = dash_a.wait(server["id"], "end", ended)
    assert server["outcome"] == "closed"
    history = dash_b.call("GET", "/api/history?limit=5")["sessions"]
    assert (history[0]["mode"], history[0]["code"], history[0]["outcome"]) == (
        "coordinated", code, "stopped")


def test_two_dashboards_behind_symmetric_nats_connect_through_the_relay(
        lab_factory: LabFactory, dashboards: list[Dashboard], tmp_path: Path) -> None:
    streams, size = 4, 512 * 1024
    lab = lab_factory("symmetric", "symmetric")
    with sharing_digests(lab, tmp_path, dashboards, streams,
                         {"label": "relayed share"}) as (dash_a, server, dash_b, client):
        assert server["path"] == client["path"] == "relay"
        # The peer is still named by its own public address, not the relay's.
        assert client["peer_address"].split(":")[0] == lab.site("a").public_ip
        for dash, session in ((dash_a, server), (dash_b, client)):
            page = dash.text(f"/sessions/{session['id']}")
            assert 'data-path="relay"' in page and "through the relay" in page
        log = dash_b.text(f"/sessions/{client['id']}")
        assert "tunnel up over the relay at 198.51.100.2:3012" in log

        assert concurrent_exchanges(lab.b1, streams, size)
        dash_b.call("DELETE", f"/api/sessions/{client['id']}")

    dash_a.wait(server["id"], "end", ended)
    history = dash_b.call("GET", "/api/history?limit=5")["sessions"]
    assert (history[0]["id"], history[0]["path"]) == (client["id"], "relay")
    assert "relayed" in dash_b.text("/history")
    csv_rows = dash_b.text("/history.csv").splitlines()
    header = csv_rows[0].split(",")
    assert csv_rows[1].split(",")[header.index("path")] == "relay"


def test_a_dashboard_tunnel_leaves_the_relay_live_when_the_direct_path_opens(
        lab_factory: LabFactory, dashboards: list[Dashboard], tmp_path: Path) -> None:
    """The path changes while the session runs: the API, the session page and its live
    stream follow, the event log says so, and the history keeps the new path."""
    lab = lab_factory("drop", "drop", delay_ms=5)
    lab.block_direct()  # the punch fails: relayed
    dash_a, dash_b = two_dashboards(lab, tmp_path, dashboards)
    with listening(lab.a1, 3000) as service:
        serve_digests(service, 2)
        server = share(dash_a, local_port=3000)
        client = join(dash_b, server["code"], local_port=3010)
        client = dash_b.wait(client["id"], "connection",
                             lambda d: d["state"] == "connected", timeout=40)
        assert client["path"] == "relay" and client["resuming"] is False
        page = f"/sessions/{client['id']}"
        live: list[str] = []
        reader = threading.Thread(target=read_stream, args=(dash_b, f"{page}/live", live),
                                  daemon=True)
        reader.start()
        lab.unblock_direct()  # the first try of a direct path comes 5 s after the relay
        for dash, session in ((dash_a, server), (dash_b, client)):
            dash.wait(session["id"], "the direct path", lambda d: d["path"] == "public",
                      timeout=40)
        deadline = time.monotonic() + 10
        while not any('data-path="public"' in chunk for chunk in live):
            assert time.monotonic() < deadline, live[-3:]
            time.sleep(0.1)
        assert any("event: path" in chunk for chunk in live)
        text = dash_b.text(page)
        assert 'data-path="public"' in text and "back to direct (public) after" in text
        for i in range(2):  # the tunnel carries new connections on its new path
            assert digest_exchange(lab.b1, 256 * 1024), i
        dash_b.call("DELETE", f"/api/sessions/{client['id']}")
    dash_a.wait(server["id"], "end", ended)
    history = dash_b.call("GET", "/api/history?limit=5")["sessions"]
    assert (history[0]["id"], history[0]["path"]) == (client["id"], "public")


def read_stream(dash: Dashboard, path: str, out: list[str]) -> None:
    """Append what a live stream sends, chunk by chunk, until it ends or fails."""
    with dash.host.enter():
        try:
            with urllib.request.urlopen(dash.url + path.lstrip("/"), timeout=60) as resp:
                while chunk := resp.read1(65536):
                    out.append(chunk.decode(errors="replace"))
        except OSError:
            return
