"""Prometheus /metrics and the /system overview."""

from __future__ import annotations

from starlette.applications import Starlette

from sumbatch.config import Settings


def install(app: Starlette, settings: Settings) -> None:
    """Add /metrics, /system and the request-latency middleware to the API's app."""
