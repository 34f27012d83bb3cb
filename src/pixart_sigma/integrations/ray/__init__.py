"""Ray front end (the `ray` extra): batches on Ray Data, and a Ray Serve application.

- `generate(prompts, output_dir=None, *, workers=None, address=None, **settings)`: many prompts over
  many workers, each with a warm model; the files `pixart-sigma batch` would write (same names, same
  pixels), or the images. `pixart-sigma batch PROMPTS.txt --ray` runs the same code.
- `app`: the Serve application builder, `serve run pixart_sigma.integrations.ray:app model_name=demo`.

Like every front end it uses the public library only, and the core never imports it. Ray is
imported when these are used, not before: every input is checked before Ray starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate", "app"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from .batch import generate

        return generate
    if name == "app":  # Serve and the web stack load only for serving
        from .serve import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
