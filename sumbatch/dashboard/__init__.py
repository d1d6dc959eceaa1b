"""The web dashboard at /dashboard: static pages, every asset in the package."""

from __future__ import annotations

from starlette.applications import Starlette


def install(app: Starlette) -> None:
    """Add the dashboard's routes to the API's app."""
