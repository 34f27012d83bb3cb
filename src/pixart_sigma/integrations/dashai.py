"""DashAI plugin: `PixArtSigmaModel` as a DashAI `TextToImageGenerationTaskModel`.

Found by DashAI through the `dashai.plugins` entry point; only that entry point imports this
module, so the core package never needs DashAI. Validation, loading and generation are the
core library's: DashAI builds a new model object for every generation job, and the second job in
a process finds the weights warm instead of loading them again.
"""

from __future__ import annotations

import logging
import time
from types import UnionType
from typing import Any, List, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, create_model
from pydantic.fields import FieldInfo

from DashAI.back.core.schema_fields import bool_field, enum_field, float_field, int_field, schema_field, string_field
from DashAI.back.core.schema_fields.base_schema import BaseSchema
from DashAI.back.core.utils import MultilingualString
from DashAI.back.dependencies.downloads.downloadable import DownloadableMixin
from DashAI.back.models.text_to_image_generation_model import TextToImageGenerationTaskModel
from DashAI.back.models.utils import DEVICE_ENUM, DEVICE_PLACEHOLDER

from .. import PixArtSigmaModel as CoreModel
from ..checkpoints import (BASE_REPO, DEMO_NAME, KNOWN_CHECKPOINTS, KNOWN_MODEL_NAMES, is_available, locate,
                           resolve_checkpoint)
from ..settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

REPO_512 = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
# What DashAI's download button fetches: the 1024 pipeline and the 512 transformer, as DashAI's own
# PixArt-Sigma component does; the 2K transformer is fetched on first use when the hub is reachable.
DOWNLOADED_MODELS = (BASE_REPO, REPO_512)
GB = 1_000_000_000
DOWNLOAD_BYTES = {name: int(known.download_gb * GB) for name, known in KNOWN_CHECKPOINTS.items()}
DOWNLOAD_BYTES[DEMO_NAME] = 0


NATIVE_SIZE = KNOWN_CHECKPOINTS[DEFAULT_MODEL].native_size
# Choices that live outside Settings (which takes any checkpoint path and any device string).
ENUMS = {"model_name": list(KNOWN_MODEL_NAMES), "device": DEVICE_ENUM}
# The form's starting value where Settings' default cannot be shown: DashAI's device labels have no
# "auto"; None means "the checkpoint's native size" or "no negative prompt".
PLACEHOLDERS = {"device": DEVICE_PLACEHOLDER, "width": NATIVE_SIZE, "height": NATIVE_SIZE, "negative_prompt": ""}
# The form always sends a size, so these are plain integers in DashAI although Settings also takes None.
NEVER_NULL = ("width", "height")
# JSON Schema keyword -> int_field/float_field keyword.
BOUND_KEYWORDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
                  "multipleOf": "multiple_of"}


def _bounds(json_property: dict) -> dict:
    """Bounds from a field's JSON Schema: Field(ge=...) and json_schema_extra both end up there."""
    merged = dict(json_property)
    for branch in json_property.get("anyOf", []):  # a nullable field may keep them in its non-null branch
        merged.update(branch)
    return {BOUND_KEYWORDS[key]: value for key, value in merged.items() if key in BOUND_KEYWORDS}


def _form_type(name: str, field: FieldInfo, json_property: dict) -> Any:
    """DashAI's type for one Settings field, without nullability."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):  # Optional[X] or X | None
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if name in ENUMS:
        return enum_field(enum=ENUMS[name])
    if get_origin(annotation) is Literal:
        return enum_field(enum=list(get_args(annotation)))
    if annotation is bool:  # before int: bool is an int subclass
        return bool_field()
    if annotation is int:
        return int_field(**_bounds(json_property))
    if annotation is float:
        return float_field(**_bounds(json_property))
    if annotation is str:
        return string_field()
    raise TypeError(f"Settings.{name}: no DashAI field for {field.annotation}; teach {__name__}._form_type")


def dashai_schema(settings: type[BaseModel] = Settings) -> type[BaseSchema]:
    """DashAI's form, built from `settings` so that each setting is declared once, in Settings.

    Label (title), description, default (placeholder), bounds and choices come from the Settings
    field; only what Settings cannot say lives in the tables above. Field order is Settings' order.
    """
    properties = settings.model_json_schema()["properties"]
    fields = {}
    for name, field in settings.model_fields.items():
        annotation = schema_field(
            _form_type(name, field, properties[name]), placeholder=PLACEHOLDERS.get(name, field.default),
            description=field.description, alias=MultilingualString(en=field.title))
        if type(None) in get_args(field.annotation) and name not in NEVER_NULL:
            # Optional outside schema_field, as DashAI's own components do: the description goes inside anyOf.
            annotation = Optional[annotation]
        fields[name] = (annotation, ...)  # required, as before: the form sends every field
    return create_model(
        "PixArtSigmaSchema", __base__=BaseSchema, __module__=__name__,
        __doc__="PixArt-Sigma text-to-image settings: checkpoint, guidance, size, seed, sampler and device.",
        **fields)


PixArtSigmaSchema = dashai_schema()


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
