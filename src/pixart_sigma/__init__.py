"""PixArt-Sigma text-to-image generation: the `PixArtSigmaModel` component and its helpers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pixart-sigma")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from .engine import MEMORY_BUDGET_ENV, unload_all  # noqa: E402
from .errors import (Cancelled, CheckpointError, GenerationError, MetadataError, PixArtSigmaError,  # noqa: E402
                     SettingsError)
from .images import check_output_dir, read_settings, reproducible_settings, save_image  # noqa: E402
from .model import PixArtSigmaModel  # noqa: E402
from .settings import Settings  # noqa: E402

__all__ = [
    "PixArtSigmaModel", "Settings", "PixArtSigmaError", "SettingsError", "CheckpointError", "GenerationError",
    "MetadataError", "Cancelled", "save_image", "read_settings", "reproducible_settings", "check_output_dir",
    "unload_all", "MEMORY_BUDGET_ENV", "__version__",
]
