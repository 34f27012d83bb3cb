"""Where pixart-sigma keeps its own files: PIXART_SIGMA_HOME, else the platform's user data folder.

The service's jobs and images live there (`serve --data-dir` overrides), and so does the LoRA folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "PIXART_SIGMA_HOME"
LORA_FOLDER = "loras"  # LoRA files and PEFT folders, looked up by name: $PIXART_SIGMA_HOME/loras


def default_data_dir() -> Path:
    """PIXART_SIGMA_HOME, else the platform's user data folder."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pixart-sigma"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "pixart-sigma"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "pixart-sigma"


def default_lora_dir() -> Path:
    """The LoRA folder names are looked up in, unless a `lora_dir` (--lora-dir) is given."""
    return default_data_dir() / LORA_FOLDER
