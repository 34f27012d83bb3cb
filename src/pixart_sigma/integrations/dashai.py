"""DashAI plugin: `PixArtSigmaModel` as a DashAI `TextToImageGenerationTaskModel`.

Found by DashAI through the `dashai.plugins` entry point; only that entry point imports this
module, so the core package never needs DashAI. Validation, loading and generation are the
core library's: DashAI builds a new model object for every generation job, and the second job in
a process finds the weights warm instead of loading them again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, List, Optional

from DashAI.back.core.schema_fields import bool_field, enum_field, float_field, int_field, schema_field, string_field
from DashAI.back.core.schema_fields.base_schema import BaseSchema
from DashAI.back.core.utils import MultilingualString
from DashAI.back.dependencies.downloads.downloadable import DownloadableMixin
from DashAI.back.models.text_to_image_generation_model import TextToImageGenerationTaskModel
from DashAI.back.models.utils import DEVICE_ENUM, DEVICE_PLACEHOLDER

from .. import PixArtSigmaModel as CoreModel
from ..checkpoints import BASE_REPO, DEMO_NAME, KNOWN_CHECKPOINTS, is_available, locate, resolve_checkpoint
from ..settings import DTYPES, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_SEQUENCE_LENGTH, MAX_STEPS, SCHEDULERS, Settings

log = logging.getLogger(__name__)

REPO_512 = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
# What DashAI's download button fetches: the 1024 pipeline and the 512 transformer, as DashAI's own
# PixArt-Sigma component does; the 2K transformer is fetched on first use when the hub is reachable.
DOWNLOADED_MODELS = (BASE_REPO, REPO_512)
GB = 1_000_000_000
DOWNLOAD_BYTES = {name: int(known.download_gb * GB) for name, known in KNOWN_CHECKPOINTS.items()}
DOWNLOAD_BYTES[DEMO_NAME] = 0


def _describe(name: str) -> str:
    return Settings.model_fields[name].description


class PixArtSigmaSchema(BaseSchema):
    """PixArt-Sigma text-to-image settings: checkpoint, guidance, size, seed, sampler and device."""

    model_name: schema_field(
        enum_field(enum=list(KNOWN_CHECKPOINTS) + [DEMO_NAME]), placeholder=BASE_REPO,
        description=_describe("model_name"), alias=MultilingualString(en="Checkpoint"))  # type: ignore
    negative_prompt: Optional[schema_field(
        string_field(), placeholder="", description=_describe("negative_prompt"), alias=MultilingualString(en="Negative prompt"))]  # type: ignore
    num_inference_steps: schema_field(
        int_field(ge=1, le=MAX_STEPS), placeholder=20, description=_describe("num_inference_steps"),
        alias=MultilingualString(en="Inference steps"))  # type: ignore
    guidance_scale: schema_field(
        float_field(ge=0.0, le=MAX_GUIDANCE), placeholder=4.5, description=_describe("guidance_scale"),
        alias=MultilingualString(en="Guidance scale"))  # type: ignore
    device: schema_field(
        enum_field(enum=DEVICE_ENUM), placeholder=DEVICE_PLACEHOLDER, description=_describe("device"),
        alias=MultilingualString(en="Device"))  # type: ignore
    seed: schema_field(
        int_field(ge=-1, le=MAX_SEED), placeholder=-1, description=_describe("seed"), alias=MultilingualString(en="Seed"))  # type: ignore
    width: schema_field(
        int_field(ge=64, le=2048, multiple_of=8), placeholder=1024, description=_describe("width"),
        alias=MultilingualString(en="Width"))  # type: ignore
    height: schema_field(
        int_field(ge=64, le=2048, multiple_of=8), placeholder=1024, description=_describe("height"),
        alias=MultilingualString(en="Height"))  # type: ignore
    num_images_per_prompt: schema_field(
        int_field(ge=1, le=MAX_IMAGES), placeholder=1, description=_describe("num_images_per_prompt"),
        alias=MultilingualString(en="Images per prompt"))  # type: ignore
    dtype: schema_field(
        enum_field(enum=list(DTYPES)), placeholder="auto", description=_describe("dtype"),
        alias=MultilingualString(en="Number format"))  # type: ignore
    scheduler: schema_field(
        enum_field(enum=list(SCHEDULERS)), placeholder="dpm-solver++", description=_describe("scheduler"),
        alias=MultilingualString(en="Sampler"))  # type: ignore
    use_resolution_binning: schema_field(
        bool_field(), placeholder=True, description=_describe("use_resolution_binning"),
        alias=MultilingualString(en="Resolution binning"))  # type: ignore
    max_sequence_length: schema_field(
        int_field(ge=1, le=MAX_SEQUENCE_LENGTH), placeholder=MAX_SEQUENCE_LENGTH,
        description=_describe("max_sequence_length"), alias=MultilingualString(en="Max prompt tokens"))  # type: ignore


class PixArtSigmaModel(DownloadableMixin, TextToImageGenerationTaskModel):
    """PixArt-Sigma (DiT-XL/2 + T5-XXL + SDXL VAE) text-to-image generation, kept warm between jobs."""

    SCHEMA = PixArtSigmaSchema
    DISPLAY_NAME: str = "PixArt-Sigma (pixart-sigma plugin)"
    DESCRIPTION: str = (
        "PixArt-Sigma, a Diffusion Transformer (DiT-XL/2) conditioned by a T5-XXL text encoder: good images in "
        "14-25 steps at guidance 3.5-5.5, at 512, 1024 or 2048 px. The model stays loaded between generations, "
        "every image remembers its settings and seed, and bad settings are explained before any work starts. "
        "A GPU is strongly recommended."
    )
    COLOR: str = "#4a148c"
    DOWNLOAD_SIZE_BYTES: int = sum(DOWNLOAD_BYTES[name] for name in DOWNLOADED_MODELS)

    def __init__(self, **kwargs: Any):
        start = time.perf_counter()
        settings = {name: value for name, value in kwargs.items() if value is not None or name == "negative_prompt"}
        self.model = CoreModel(**settings)
        self.construction_seconds = time.perf_counter() - start
        log.info("PixArt-Sigma ready in %.2f s", self.construction_seconds)

    @classmethod
    def validate_and_transform(cls, raw_data: dict) -> dict:
        """Our validation (messages that name field, value and what is valid), not only DashAI's schema."""
        return CoreModel.validate_and_transform(raw_data)

    def generate(self, input: str) -> List[Any]:
        return self.model.generate(input)

    @classmethod
    def get_metadata(cls) -> dict:
        metadata = super().get_metadata()
        metadata["download_size_bytes_by_model"] = dict(DOWNLOAD_BYTES)
        return metadata

    # -- DashAI's download contract, on the shared Hugging Face cache (HF_HOME) ------------------
    @classmethod
    def is_downloaded(cls) -> bool:
        return all(is_available(name) for name in DOWNLOADED_MODELS)

    @classmethod
    def download(cls, report=None) -> None:
        for index, name in enumerate(DOWNLOADED_MODELS):
            if report:
                report(index / len(DOWNLOADED_MODELS), f"downloading {name}")
            locate(resolve_checkpoint(name))
        if report:
            report(1.0, "done")

    @classmethod
    def delete(cls) -> None:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
        revisions = [revision.commit_hash for repo in cache.repos if repo.repo_id in KNOWN_CHECKPOINTS
                     for revision in repo.revisions]
        cache.delete_revisions(*revisions).execute()
