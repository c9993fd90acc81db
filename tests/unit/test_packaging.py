"""The wheel carries the package and its top-level assets (templates, static, migrations)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from nopf_web import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_assets_and_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("nopf_web-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nopf_web/sessions/engine.py" in names
    for folder in ("templates", "static", "migrations"):
        on_disk = {p.relative_to(ROOT / folder).as_posix()
                   for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert on_disk, f"{folder}/ is empty in the source tree"
        for rel in on_disk:
            assert f"nopf_web/{folder}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("nopf = nopf_web.cli.peer:main", "nopf-server = nopf_web.cli.server:main",
                   "nopf-web = nopf_web.cli.web:main"):
        assert script in text
    # One version, nopf_web.__version__: the wheel's, --version's and the pages' footer.
    assert wheel.name.startswith(f"nopf_web-{__version__}-")
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()
