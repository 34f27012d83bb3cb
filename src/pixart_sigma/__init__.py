"""PixArt-Sigma text-to-image generation: the `PixArtSigmaModel` component and its helpers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pixart-sigma")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from .batch import plan_batch, read_prompt_file  # noqa: E402
from .calls import check_edit, random_seed  # noqa: E402
from .checkpoints import DEMO_NAME, KNOWN_MODEL_NAMES, checkpoint_statuses  # noqa: E402
from .compiling import COMPILE_COST  # noqa: E402
from .editing import picture_sha256, read_mask, read_picture  # noqa: E402
from .engine import MEMORY_BUDGET_ENV, unload_all  # noqa: E402
from .errors import (Cancelled, CheckpointError, GenerationError, MetadataError, PixArtSigmaError,  # noqa: E402
                     SettingsError)
from .images import (batch_settings, check_output_dir, edit_settings, output_name, read_settings,  # noqa: E402
                     reproducible_settings, save_image)
from .grid import (MAX_GRID_CELLS, Grid, GridFiles, GridPlan, axis_names, make_grid, plan_grid,  # noqa: E402
                   read_grid)
from .home import default_lora_dir  # noqa: E402
from .loras import (LoraListing, find_by_hash, folder_loras, list_loras, prepare_loras, recorded_loras,  # noqa: E402
                    resolve_lora, sha256_of)
from .lora_training import LoraTrainingSettings, TrainingResult, train_lora  # noqa: E402
from .lora_training import check_settings as check_training_settings  # noqa: E402
from .model import PixArtSigmaModel  # noqa: E402
from .quiet import quiet_libraries  # noqa: E402
from .settings import (DEFAULT_MODEL, MAX_LORA_SCALE, MAX_LORAS, MEMORY_MODES, EditSettings, LoraSetting,  # noqa: E402
                       Settings, check_images_per_call, check_pixel_budget, check_text)

__all__ = [
    "LoraSetting", "MAX_LORAS", "MAX_LORA_SCALE", "recorded_loras", "prepare_loras", "resolve_lora", "folder_loras",
    "find_by_hash", "list_loras", "LoraListing", "train_lora", "LoraTrainingSettings", "TrainingResult",
    "check_training_settings", "default_lora_dir", "sha256_of",
    "PixArtSigmaModel", "Settings", "EditSettings", "PixArtSigmaError", "SettingsError", "CheckpointError", "GenerationError",
    "MetadataError", "Cancelled", "save_image", "read_settings", "reproducible_settings", "check_output_dir",
    "unload_all", "MEMORY_BUDGET_ENV", "random_seed", "quiet_libraries", "__version__",
    # what the front ends (CLI, service, Ray, DashAI) use beside the component
    "output_name", "batch_settings", "plan_batch", "read_prompt_file", "check_text", "check_images_per_call",
    "check_pixel_budget", "DEFAULT_MODEL", "DEMO_NAME", "KNOWN_MODEL_NAMES", "MEMORY_MODES", "COMPILE_COST",
    "checkpoint_statuses", "edit_settings", "read_picture", "read_mask", "picture_sha256", "check_edit",
    # the comparison grid (grid.py)
    "plan_grid", "make_grid", "read_grid", "axis_names", "GridPlan", "Grid", "GridFiles", "MAX_GRID_CELLS",
]
