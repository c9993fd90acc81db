"""The dashboard: aiohttp app, HTML views and htmx fragments, JSON API, security."""

from .app import StartupError, create_app
from .config import WebConfig

__all__ = ["StartupError", "WebConfig", "create_app"]
