"""Find the data directories shipped with nopf: templates, static files, migrations.

In a source checkout (and an editable install) they are top-level folders
next to the ``nopf_web`` package; a wheel force-includes them inside the
package (see pyproject.toml), so both places are looked at, the package first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

ResourceName = Literal["templates", "static", "migrations"]

_PACKAGE_DIR = Path(__file__).resolve().parent


class ResourceMissing(RuntimeError):
    """A data directory is in neither place: a broken install."""


def resource_dir(name: ResourceName) -> Path:
    """The directory ``name`` of this installation (installed wheel or source tree)."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ResourceMissing(
        f"nopf's {name!r} directory is missing (looked in {_PACKAGE_DIR} and its parent): "
        "reinstall nopf-web"
    )
