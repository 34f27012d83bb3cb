"""Routes other clients already speak (OpenAI's Images API, A1111's txt2img), translated into our jobs."""

from __future__ import annotations


def install(app, service) -> None:
    """Add the compatibility routes to `app` (filled in by the compatibility work)."""
