"""Make the lab fixture available to the lab's own tests even without
``pytest_plugins = ["tests.lab.fixtures"]`` in tests/conftest.py."""

from tests.lab.fixtures import lab_factory

__all__ = ["lab_factory"]
