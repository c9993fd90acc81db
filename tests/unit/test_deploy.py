"""The deployment files stay in step with the code: the systemd unit's and the
Dockerfile's nopf-server flags parse, and the Dockerfile's build context is enough
to build the wheel (Docker itself does not run on the test machine)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nopf_web.cli.server import _relay_limits, build_parser

pytestmark = pytest.mark.linux_only("the server's deployment files are for Linux (systemd, Docker)")

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "nopf-server.service"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def unit_settings() -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines (continuations joined), values per key."""
    settings: dict[str, list[str]] = {}
    text = UNIT.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_units_command_line_is_valid_for_nopf_server() -> None:
    settings = unit_settings()
    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/nopf-server")
    args = build_parser().parse_args(argv[1:])
    relay = _relay_limits(args)
    assert relay.enabled and relay.rate == 12.5e6 and relay.max_sessions == 64
    # What the README promises of it.
    assert settings["DynamicUser"] == ["yes"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert int(settings["LimitNOFILE"][0]) >= 65536
    assert "@system-service" in settings["SystemCallFilter"]  # includes splice(2)


def test_the_dockerfile_context_builds_the_wheel(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.split() for line in text.splitlines() if line.startswith("COPY ")]
    assert lines, "the Dockerfile copies nothing"
    context = tmp_path / "context"
    context.mkdir()
    for words in lines:
        for source in words[1:-1]:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / source,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, context / source)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(tmp_path), str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("nopf_web-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nopf-server = nopf_web.cli.server:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
    # The image: slim Python 3.11, a non-root user, the port, nopf-server with valid flags.
    assert "FROM python:3.11-slim" in text and "\nUSER nopf\n" in text
    assert "EXPOSE 3012/tcp" in text
    (entry,) = [json.loads(line.removeprefix("ENTRYPOINT "))
                for line in text.splitlines() if line.startswith("ENTRYPOINT ")]
    assert entry[0] == "nopf-server"
    build_parser().parse_args([*entry[1:], "--relay-rate", "12.5M"])


def test_the_multi_node_example_parses_and_its_url_is_valid() -> None:
    from nopf_web.rendezvous.cluster import RedisConfig

    deploy = ROOT / "deploy"
    text = (deploy / "compose.multi-node.yaml").read_text(encoding="utf-8")
    entries = [json.loads(line.split("entrypoint:", 1)[1].replace("${", "").replace(":?}", "")
                          .replace("}", ""))
               for line in text.splitlines() if "entrypoint:" in line]
    assert len(entries) == 3  # three nodes
    for entry in entries:
        assert entry[0] == "nopf-server"
        build_parser().parse_args(entry[1:])
    assert text.count("NOPF_REDIS_URL: redis://127.0.0.1:6379/0") == 1  # one anchor, shared
    env = dict(line.split("=", 1) for line in
               (deploy / "nopf-server-node.env").read_text(encoding="utf-8").splitlines()
               if line and not line.startswith("#"))
    assert RedisConfig.from_env(None, env) is not None
    assert "multi-node.md" in DOCKERFILE.read_text(encoding="utf-8")
    assert '".[redis]"' in DOCKERFILE.read_text(encoding="utf-8")
