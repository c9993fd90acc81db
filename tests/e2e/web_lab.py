"""Dashboards (``nopf-web``) in the namespace lab, driven through their JSON API: start
one in a host, create sessions, wait for their states."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import Host, Lab
from tests.programs import argv

from .peers import RDV, start_rendezvous


@dataclass
class Dashboard:
    host: Host
    url: str
    proc: subprocess.Popen[str]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with self.host.enter():  # the dashboard listens on loopback inside the namespace
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"{method} {path}: {exc.code} {exc.read()!r}") from None

    def text(self, path: str) -> str:
        """A page (or export) as text."""
        with self.host.enter(), urllib.request.urlopen(self.url + path.lstrip("/"),
                                                       timeout=10) as resp:
            return str(resp.read().decode())

    def session(self, session_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.call("GET", f"/api/sessions/{session_id}")
        return data

    def wait(self, session_id: str, what: str, ok: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            data = self.session(session_id)
            if ok(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.host.name}: no {what} within {timeout} s: {data}")
            time.sleep(0.1)


def start_dashboard(host: Host, db: Path, started: list[Dashboard]) -> Dashboard:
    proc: subprocess.Popen[str] = host.popen(  # type: ignore[assignment]
        argv("nopf-web", "--port", "8080", "--db", str(db), "--rendezvous", RDV),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url == "http://127.0.0.1:8080/", proc.stderr.read() if proc.stderr else url
    dashboard = Dashboard(host, url, proc)
    started.append(dashboard)
    return dashboard


def two_dashboards(lab: Lab, tmp_path: Path,
                   started: list[Dashboard]) -> tuple[Dashboard, Dashboard]:
    """The lab's rendezvous, then a dashboard in a1 and one in b1."""
    start_rendezvous(lab)
    return (start_dashboard(lab.a1, tmp_path / "a.sqlite3", started),
            start_dashboard(lab.b1, tmp_path / "b.sqlite3", started))


def connected(d: dict[str, Any]) -> bool:
    assert d["outcome"] is None, d
    return bool(d["state"] == "connected")


def ended(d: dict[str, Any]) -> bool:
    return d["outcome"] is not None


def share(dash: Dashboard, **body: Any) -> dict[str, Any]:
    """A server session (coordinated unless ``body`` says otherwise) once it has its code."""
    server = dash.call("POST", "/api/sessions", {"role": "server", **body})
    return dash.wait(server["id"], "pairing code", lambda d: d["code"] is not None)


def join(dash: Dashboard, code: str, **body: Any) -> dict[str, Any]:
    """A client session joining with ``code``, as created."""
    client: dict[str, Any] = dash.call("POST", "/api/sessions",
                                       {"role": "client", "code": code, **body})
    return client


def both_connected(dash_a: Dashboard, server: dict[str, Any], dash_b: Dashboard,
                   client: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two sessions once connected (neither may end first)."""
    return (dash_a.wait(server["id"], "connection", connected),
            dash_b.wait(client["id"], "connection", connected))
