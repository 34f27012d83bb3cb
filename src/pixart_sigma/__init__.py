"""PixArt-Sigma text-to-image generation: the `PixArtSigmaModel` component and its helpers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pixart-sigma")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from .checkpoints import CheckpointError  # noqa: E402
from .engine import Cancelled, GenerationError, unload_all  # noqa: E402
from .images import read_settings, reproducible_settings, save_image  # noqa: E402
from .model import PixArtSigmaModel  # noqa: E402
from .settings import Settings, SettingsError  # noqa: E402

__all__ = [
    "PixArtSigmaModel", "Settings", "SettingsError", "CheckpointError", "GenerationError", "Cancelled",
    "save_image", "read_settings", "reproducible_settings", "unload_all", "__version__",
]
