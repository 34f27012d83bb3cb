"""Every error the library raises on purpose, under one base class.

Catch `PixArtSigmaError` to handle anything pixart-sigma refuses or stops; each message is
meant for people: it names the field or file, the value, the rule and what would be valid.
"""

from __future__ import annotations

import re

_FIELD = re.compile(r"^(?:unknown setting ')?([A-Za-z_][A-Za-z0-9_]*)")


class PixArtSigmaError(Exception):
    """Base class of everything the library refuses (bad settings, checkpoints, files) or stops."""


class SettingsError(PixArtSigmaError, ValueError):
    """Bad user input. The message is meant for people: field, value, rule, what is valid."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1
                         else "\n".join(["invalid settings:"] + [f"  - {p}" for p in self.problems]))

    def by_field(self) -> dict[str, list[str]]:
        """Problems grouped by the field each names first (every message starts with its field's name)."""
        grouped: dict[str, list[str]] = {}
        for problem in self.problems:
            match = _FIELD.match(problem)
            grouped.setdefault(match.group(1) if match else "settings", []).append(problem)
        return grouped


class MetadataError(PixArtSigmaError, ValueError):
    """An image file's embedded settings are missing, malformed or unsafe; the message names the file and field."""


class CheckpointError(PixArtSigmaError, RuntimeError):
    """A checkpoint cannot be found, read or trusted. The message says what to do."""


class GenerationError(PixArtSigmaError, RuntimeError):
    """The model ran but produced something unusable (e.g. NaN), or was called in a way that cannot work."""


class Cancelled(PixArtSigmaError):
    """Raised out of `generate` when the caller's cancel flag was set; no images are returned."""
