"""resource_dir: the package's own copy (a wheel) first, then the source tree's."""

from __future__ import annotations

from pathlib import Path

import pytest

from nopf_web import resources


def test_an_installed_copy_inside_the_package_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "nopf_web"
    (package / "templates").mkdir(parents=True)
    (tmp_path / "site" / "templates").mkdir()
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert resources.resource_dir("templates") == package / "templates"


def test_the_source_tree_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "nopf_web"
    package.mkdir()
    (tmp_path / "migrations").mkdir()
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert resources.resource_dir("migrations") == tmp_path / "migrations"


def test_a_missing_directory_says_to_reinstall(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_PACKAGE_DIR", tmp_path / "nopf_web")
    with pytest.raises(resources.ResourceMissing, match="reinstall"):
        resources.resource_dir("static")
