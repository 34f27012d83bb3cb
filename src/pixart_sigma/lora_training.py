"""Train a LoRA for a PixArt-Sigma transformer from a folder of captioned pictures (`pixart-sigma train-lora`).

- Data: a folder of pictures with captions in same-name `.txt` files (kohya / ai-toolkit), or a
  `metadata.jsonl` of {"file_name", "text"} lines (Hugging Face's imagefolder; "caption" or "prompt" are read
  too). Everything is checked before a model is loaded, every problem named with its file: an empty folder,
  pictures that cannot be read, missing or empty captions, captions over max_sequence_length tokens, pictures
  too small for their bucket (enlarged more than MAX_ENLARGEMENT) or too elongated for PixArt's buckets.
- Buckets: each picture goes to the nearest of PixArt's aspect-ratio bins for the training resolution (a
  square of it when the resolution has no table), is resized to cover it and centre-cropped; a batch holds
  one bucket. Pictures are never flipped (captions name left and right).
- Cheap on small machines: captions are encoded once and T5 is freed; latents are encoded once (the VAE's
  latent mean) and the VAE freed unless samples are wanted; the transformer stays in bfloat16 (float16 on a
  GPU without it) while the LoRA weights train in float32; gradient checkpointing.
- peft's LoRA layers (`inject_adapter_in_model`); epsilon-prediction MSE on uniformly drawn timesteps of the
  checkpoint's schedule, AdamW, a linear warm-up, gradients clipped to MAX_GRAD_NORM.
- State (LoRA, optimizer, step, random streams) is saved every `save_every` steps in `<output>.training/`, with
  the LoRA so far as `<output stem>-step<N>.safetensors`; `resume` goes on from there and ends with the same
  file as a run that never stopped. Ctrl-C saves the state and stops.
- The result is the flat diffusers/PEFT layout (`transformer.<module>.lora_A/B.weight`, alpha in diffusers'
  header), with the base model, rank, alpha, steps and the data's SHA-256 in the header's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import glob
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SettingsError
from .settings import DEFAULT_MODEL, DTYPES, MAX_SEQUENCE_LENGTH, MAX_SIDE, MAX_STEPS, MIN_SIDE, shown

log = logging.getLogger(__name__)

# -- bounds and names (each fact once) -------------------------------------------------------------------------
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption", "prompt")  # read from metadata.jsonl, first found
MAX_PICTURES = 100_000
MAX_DEPTH = 4  # subfolders looked into (kohya sorts pictures into repeat folders)
MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_NAME_CHARS = 1000  # a file name in metadata.jsonl
MAX_CHARS_PER_TOKEN = 64  # a caption longer than this many characters per allowed token cannot fit: not tokenized
MAX_ENLARGEMENT = 2.0  # a picture enlarged more than this per side to cover its bucket would train on blur
MAX_ASPECT = 4.0  # PixArt's bins go from 1:4 to 4:1
MAX_GRAD_NORM = 1.0
MAX_TRAINING_STEPS = 1_000_000
WARMUP_SHARE = 0.05  # of the steps, learning rate rising linearly (at most MAX_WARMUP_STEPS)
MAX_WARMUP_STEPS = 100
COSINE_FLOOR = 0.1  # the cosine schedule's last learning rate, as a share of the peak
SHOWN_PROBLEMS = 30  # a data error lists this many problems, then counts the rest
STATE_FILE = "state.pt"
METADATA_PREFIX = "pixart_sigma."
TARGET_PRESETS = {
    "attention": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "attention+ff": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"),
    "all": (),  # every module a LoRA can target (lora_formats.transformer_targets)
}


class LoraTrainingSettings(BaseModel):
    """What `train_lora` does; each field is a `train-lora` flag of the same name (underscores as dashes)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_name: str = Field(DEFAULT_MODEL, description="the base checkpoint: a known id, 'demo', or a local folder")
    rank: int = Field(16, ge=1, le=256, description="the LoRA's rank (its size: 4-32 is usual)")
    alpha: Optional[float] = Field(None, gt=0, le=1024, description="LoRA alpha (default: the rank, so scale 1)")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW's peak learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after a short linear warm-up: 'cosine' falls to a tenth of the peak by the last "
        "step (finer detail at the end), 'constant' stays at the peak")
    steps: Optional[int] = Field(None, ge=1, le=MAX_TRAINING_STEPS,
                                 description="optimizer steps (default 1000 unless --epochs is given); a resumed run may "
                                 "be given more, and its schedule then follows the new total")
    epochs: Optional[int] = Field(None, ge=1, le=100_000, description="passes over the data, instead of --steps")
    batch_size: int = Field(1, ge=1, le=256, description="pictures per step (of one aspect-ratio bucket)")
    resolution: Optional[int] = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16,
                                      description="training size in pixels (default: the checkpoint's native size); "
                                      "256, 512, 1024 and 2048 use PixArt's aspect-ratio buckets, others a square")
    buckets: bool = Field(True, description="aspect-ratio buckets (off: every picture cropped to a square)")
    targets: str = Field("attention+ff", max_length=4000,
                         description="the modules trained: 'attention', 'attention+ff' or 'all', or module names "
                         "separated by commas (an ending such as 'attn2.to_k' matches it in every block)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the seed of the LoRA's start, the noise and the order")
    caption_dropout: float = Field(0.05, ge=0, le=1, description="share of steps' captions replaced by the empty "
                                   "prompt, so guidance keeps working")
    max_sequence_length: int = Field(MAX_SEQUENCE_LENGTH, ge=1, le=MAX_SEQUENCE_LENGTH, description="T5 tokens a caption may have")
    save_every: int = Field(500, ge=0, le=1_000_000, description="save the state and the LoRA so far every N "
                            "steps (0: only at the end)")
    sample_every: int = Field(0, ge=0, le=1_000_000, description="draw the sample prompts every N steps (0: only "
                              "at the end, if any are given)")
    sample_prompts: list[str] = Field(default_factory=list, max_length=16,
                                      description="prompts drawn with the LoRA so far, into <output>-samples/")
    sample_steps: int = Field(20, ge=1, le=MAX_STEPS, description="sampler steps of each sample")
    gradient_checkpointing: bool = Field(True, description="recompute activations in the backward pass: far less "
                                         "memory, about a third slower")
    device: str = Field("auto", description="'auto' (the first GPU, else the CPU), 'cpu', 'cuda', 'cuda:N', 'mps'")
    dtype: Literal[DTYPES] = Field("auto", description="the frozen base's format: 'auto' (bfloat16 where the device has it, "
                       "float16 on an older GPU, else float32), 'bfloat16', 'float16' or 'float32'; the LoRA trains "
                       "in float32")

    @field_validator("sample_prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        for index, prompt in enumerate(value):
            if not prompt.strip() or len(prompt) > 2000:
                raise ValueError(f"sample_prompts.{index}={shown(prompt)} must be 1 to 2000 characters")
        return value

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None and self.epochs is not None:
            raise SettingsError([f"steps={self.steps} and epochs={self.epochs}: give one of them"])
        return self.epochs * steps_per_epoch if self.epochs is not None else (self.steps or 1000)

    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def check_settings(raw: dict[str, Any]) -> LoraTrainingSettings:
    """The settings checked: SettingsError naming each field, its value and the rule."""
    try:
        settings = LoraTrainingSettings(**raw)
    except ValidationError as exc:
        raise SettingsError([f"{'.'.join(str(p) for p in e['loc'])}={shown(e.get('input'))}: {e['msg']}"
                             for e in exc.errors()]) from None
    settings.total_steps(1)  # steps and epochs together are refused now
    return settings


# -- the data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    picture: Path
    caption: str
    size: tuple[int, int]  # width, height


class DataError(SettingsError):
    """Training data refused: every problem, each naming its file (the first SHOWN_PROBLEMS shown, then a count)."""

    def __init__(self, folder: Path, problems: list[str]):
        self.problems = list(problems)
        shown_problems = problems[:SHOWN_PROBLEMS] + ([f"... and {len(problems) - SHOWN_PROBLEMS} more"]
                                                      if len(problems) > SHOWN_PROBLEMS else [])
        Exception.__init__(self, "\n".join([f"the training data in {folder} has {len(problems)} problem(s), "
                                            "found before training:"] + [f"  - {p}" for p in shown_problems]))


def _pictures_in(folder: Path) -> list[Path]:
    found = []
    for root, folders, files in os.walk(folder):
        root_path = Path(root)
        depth = len(root_path.relative_to(folder).parts)
        folders[:] = sorted(f for f in folders if not f.startswith(".") and depth < MAX_DEPTH)
        found += [root_path / f for f in sorted(files)
                  if f.lower().endswith(PICTURE_SUFFIXES) and not f.startswith(".")]
        if len(found) > MAX_PICTURES:
            raise SettingsError([f"{folder} holds more than {MAX_PICTURES:,} pictures: train on a folder of its own"])
    return sorted(found)


def _read_text(path: Path, limit: int, folder: Path) -> str:
    """A caption or metadata file: inside `folder` (after links), a regular file of at most `limit` bytes, UTF-8."""
    from .checkpoints import regular_file
    from .errors import CheckpointError

    if not path.resolve().is_relative_to(folder.resolve()):
        raise SettingsError([f"{path} links outside {folder}: captions are read from the data folder only"])
    try:
        regular_file(path, limit)
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except CheckpointError as exc:
        raise SettingsError([str(exc)]) from None
    except OSError as exc:
        raise SettingsError([f"{path} cannot be read ({exc.strerror or exc})"]) from None
    if len(data) > limit:
        raise SettingsError([f"{path} is over {limit:,} bytes"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SettingsError([f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def _plain_name(value: str) -> bool:
    """A file name a metadata line may give: printable, no NUL, encodable, not absurdly long."""
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return 0 < len(value) <= MAX_NAME_CHARS and "\0" not in value and value.isprintable()


def _metadata_captions(folder: Path, problems: list[str]) -> dict[Path, str]:
    """file -> caption from metadata.jsonl; each bad line named."""
    path = folder / METADATA_FILE
    captions: dict[Path, str] = {}
    try:
        text = _read_text(path, MAX_METADATA_BYTES, folder)
    except SettingsError as exc:
        problems += exc.problems
        return captions
    for number, line in enumerate(text.split("\n"), 1):  # JSON keeps U+2028 and the like raw: not line ends
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where} is not JSON ({exc.msg})")
            continue
        except (ValueError, RecursionError):  # a number of thousands of digits, brackets nested past the limit
            problems.append(f"{where} is not JSON this reader takes (nested too deep, or a number too long)")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f"{where} has no \"file_name\" (a string): each line is "
                            "{\"file_name\": \"a.png\", \"text\": \"its caption\"}")
            continue
        if not _plain_name(row["file_name"]):
            problems.append(f"{where}: file_name={shown(row['file_name'])} is not a file name (printable, at most "
                            f"{MAX_NAME_CHARS} characters)")
            continue
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if column is None or not isinstance(row[column], str):
            problems.append(f"{where}: no caption (a string in {' or '.join(CAPTION_COLUMNS)})")
            continue
        try:
            size = len(row[column].encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
            problems.append(f"{where}: the caption is not valid Unicode text")
            continue
        if size > MAX_CAPTION_BYTES:
            problems.append(f"{where}: the caption is over {MAX_CAPTION_BYTES:,} bytes")
            continue
        picture = (folder / row["file_name"]).resolve()
        if not picture.is_relative_to(folder.resolve()):
            problems.append(f"{where}: file_name={shown(row['file_name'])} is outside {folder}")
            continue
        if picture in captions:
            problems.append(f"{where}: {shown(row['file_name'])} is listed twice")
        captions[picture] = row[column]
    return captions


def _bucket_sizes(resolution: int, buckets: bool) -> list[tuple[int, int]]:
    """(width, height) of each bucket: PixArt's bins for the resolution, or one square."""
    from .sizes import aspect_ratio_bins

    bins = aspect_ratio_bins(resolution) if buckets else None
    if bins is None:
        return [(resolution, resolution)]
    return [(int(hw[1]), int(hw[0])) for hw in bins.values()]


def bucket_of(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest in aspect ratio (height / width, the first of equals, as diffusers' bins)."""
    ratio = size[1] / size[0]
    return min(buckets, key=lambda b: abs(b[1] / b[0] - ratio))


def read_dataset(folder: Union[str, Path], tokenizer, settings: LoraTrainingSettings,
                 resolution: int) -> list[Example]:
    """Every picture of the folder with its caption; every problem at once (SettingsError), before any model loads."""
    from .editing import read_picture

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise SettingsError([f"data={shown(str(folder))}: {what} (give a folder of pictures with captions)"])
    pictures = _pictures_in(folder)
    if not pictures:
        raise SettingsError([f"{folder} holds no pictures ({', '.join(PICTURE_SUFFIXES)}): put the pictures there, "
                             f"each with its caption in a same-name {CAPTION_SUFFIX} file or in {METADATA_FILE}"])
    problems: list[str] = []
    from_metadata = os.path.lexists(folder / METADATA_FILE)  # whatever it is: a FIFO or a folder is refused, not skipped
    captions = _metadata_captions(folder, problems) if from_metadata else {}
    buckets = _bucket_sizes(resolution, settings.buckets)
    examples, seen, caption_files = [], {}, {}
    for picture in pictures:
        real = picture.resolve()
        if not real.is_relative_to(folder.resolve()):
            problems.append(f"{picture} links outside {folder}")
            continue
        if real in seen:
            problems.append(f"{picture} is {seen[real]} again (a link): each picture once")
            continue
        seen[real] = picture
        if from_metadata:
            caption = captions.pop(picture.resolve(), None)
            if caption is None:
                problems.append(f"{picture}: no caption in {METADATA_FILE}")
                continue
        else:
            text_file = next((picture.with_suffix(suffix) for suffix in (CAPTION_SUFFIX, CAPTION_SUFFIX.upper())
                              if os.path.lexists(picture.with_suffix(suffix))), None)
            if text_file is None:
                problems.append(f"{picture}: no caption file {picture.with_suffix(CAPTION_SUFFIX).name}")
                continue
            if text_file in caption_files:
                problems.append(f"{picture} and {caption_files[text_file].name} share the caption file "
                                f"{text_file.name}: rename one picture and give it a caption of its own")
                continue
            caption_files[text_file] = picture
            try:
                caption = _read_text(text_file, MAX_CAPTION_BYTES, folder)
            except SettingsError as exc:
                problems += exc.problems
                continue
        caption = " ".join(caption.split())
        if not caption:
            problems.append(f"{picture}: its caption is empty")
            continue
        if len(caption) > settings.max_sequence_length * MAX_CHARS_PER_TOKEN:  # long past the limit: not tokenized
            problems.append(f"{picture}: its caption is {len(caption):,} characters, far over max_sequence_length="
                            f"{settings.max_sequence_length} tokens; shorten it")
            continue
        tokens = len(tokenizer(caption, add_special_tokens=True).input_ids)
        if tokens > settings.max_sequence_length:
            problems.append(f"{picture}: its caption is {tokens} tokens, over max_sequence_length="
                            f"{settings.max_sequence_length}; shorten it")
            continue
        try:
            with read_picture(picture, "picture") as image:
                size = image.size
        except SettingsError as exc:
            problems += [f"{picture}: {p}" for p in exc.problems]
            continue
        width, height = size
        if max(width / height, height / width) > MAX_ASPECT:
            problems.append(f"{picture} is {width}x{height}: longer than {MAX_ASPECT:g} times its width or height "
                            "(PixArt's buckets go from 1:4 to 4:1); crop it")
            continue
        bucket = bucket_of(size, buckets)
        enlargement = max(bucket[0] / width, bucket[1] / height)
        if enlargement > MAX_ENLARGEMENT:
            problems.append(f"{picture} is {width}x{height}: its bucket {bucket[0]}x{bucket[1]} would enlarge it "
                            f"{enlargement:.1f} times (at most {MAX_ENLARGEMENT:g}); use a larger picture or a lower "
                            "resolution")
            continue
        examples.append(Example(picture, caption, size))
    for leftover in sorted(captions):
        problems.append(f"{METADATA_FILE} names {shown(leftover.name)}, which is not a picture of {folder}")
    if problems:
        raise DataError(folder, problems)
    return examples


def data_sha256(examples: list[Example], folder: Path) -> str:
    """What the data is: each picture's name, bytes and caption."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(os.fsencode(example.picture.relative_to(folder)) + b"\0" + example.caption.encode() + b"\0")
        with open(example.picture, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# -- targets -------------------------------------------------------------------------------------------------
def target_modules(targets: str, transformer_config) -> list[str]:
    """The module names `targets` means for this transformer (a preset, or names / endings separated by commas)."""
    from .lora_formats import transformer_targets

    every = transformer_targets(transformer_config)
    if targets in TARGET_PRESETS:
        endings = TARGET_PRESETS[targets]
        return sorted(m for m in every if not endings or m.endswith(endings))
    chosen, unknown = set(), []
    for part in (p.strip() for p in targets.split(",")):
        matches = [m for m in every if m == part or m.endswith("." + part)]
        if not part or not matches:
            unknown.append(part)
        chosen.update(matches)
    if unknown:
        raise SettingsError([f"targets={shown(targets)}: {', '.join(repr(u) for u in unknown)} match no module; give "
                             f"{', '.join(TARGET_PRESETS)} or module names such as attn2.to_k, ff.net.2, "
                             "transformer_blocks.0.attn1.to_q"])
    return sorted(chosen)


# -- training --------------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    output: Path
    steps: int
    seconds: float
    final_loss: float
    stopped: bool  # by Ctrl-C or stop_after: the state is saved, `resume` goes on


def state_dir(output: Path) -> Path:
    return output.with_name(output.name + ".training")


def _resume_key(settings: LoraTrainingSettings, data_hash: str) -> dict[str, Any]:
    """What must not change between a run and its resumption (the rest only says how long or how often)."""
    kept = settings.model_dump(exclude={"steps", "epochs", "save_every", "sample_every", "sample_prompts",
                                        "sample_steps", "device", "gradient_checkpointing"})
    return {**kept, "data_sha256": data_hash}


def _atomic_save(write: Callable[[Path], Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    write(temporary)
    os.replace(temporary, path)


class _Trainer:
    def __init__(self, data: Path, output: Path, settings: LoraTrainingSettings):
        import torch

        from .checkpoints import load_part, locate, part_config, resolve_checkpoint
        from .devices import resolve_device, resolve_dtype

        self.data, self.output, self.settings = data, output, settings
        if not data.is_dir() or not _pictures_in(data):  # said before a checkpoint is looked for (or downloaded)
            read_dataset(data, None, settings, 0)
        checkpoint = resolve_checkpoint(settings.model_name)
        self.located = locate(checkpoint)
        folders = self.located.folders
        self.transformer_config = part_config(folders["transformer"], "transformer")
        self.resolution = settings.resolution or checkpoint.native_size
        if self.resolution is None:
            raise SettingsError([f"resolution: {settings.model_name} does not say its native size (its transformer's "
                                 "sample_size); give --resolution"])
        self.modules = target_modules(settings.targets, self.transformer_config)
        tokenizer = load_part(folders["tokenizer"], "tokenizer", None)
        self.examples = read_dataset(data, tokenizer, settings, self.resolution)
        self.data_hash = data_sha256(self.examples, data)
        self.device = resolve_device(settings.device)
        self.dtype = (resolve_dtype("bfloat16", self.device) if settings.dtype == "auto" and _has_bfloat16(self.device)
                      else torch.float16 if settings.dtype == "auto" and self.device.type == "cuda"
                      else torch.float32 if settings.dtype == "auto" else resolve_dtype(settings.dtype, self.device))
        sizes = _bucket_sizes(self.resolution, settings.buckets)
        self.buckets = [bucket_of(e.size, sizes) for e in self.examples]
        self._tokenizer = tokenizer

    # -- caches ----------------------------------------------------------------------------------------------
    def encode_texts(self) -> None:
        """Every caption, the empty prompt and the sample prompts through T5 once; then T5 is freed."""
        import gc

        import torch

        from .checkpoints import load_part
        from .engine import TextEncoder

        encoder = load_part(self.located.folders["text_encoder"], "text_encoder", self.dtype).to(self.device).eval()
        text = TextEncoder(self._tokenizer, encoder, self.device)
        length = self.settings.max_sequence_length

        def encoded(caption: str):
            result = text.encode(caption, length, use_cache=False)
            kept = int(result.mask.sum())
            return result.embeds[0, :kept].to("cpu", self.dtype), kept

        self.captions = [encoded(e.caption) for e in self.examples]
        self.empty = encoded("")
        self.samples = [encoded(p) for p in self.settings.sample_prompts]
        text.encoder = encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def encode_pictures(self) -> None:
        """Each picture covered and centre-cropped to its bucket, then its latent mean, in float32 on the CPU."""
        import gc

        import numpy as np
        import torch
        from PIL import Image

        from .checkpoints import load_part
        from .editing import read_picture

        vae = load_part(self.located.folders["vae"], "vae", torch.float32).to(self.device).eval()
        self.latents = []
        for example, bucket in zip(self.examples, self.buckets):
            with read_picture(example.picture, "picture") as image:
                image = _rgb(image)
                cover = max(bucket[0] / image.width, bucket[1] / image.height)
                size = (max(bucket[0], round(image.width * cover)), max(bucket[1], round(image.height * cover)))
                if size != image.size:
                    image = image.resize(size, Image.LANCZOS)
                left, top = (size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2
                image = image.crop((left, top, left + bucket[0], top + bucket[1]))
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            with torch.inference_mode():
                mean = vae.encode(pixels.to(self.device)).latent_dist.mean * vae.config.scaling_factor
            self.latents.append(mean[0].to("cpu", torch.float32))
        self.vae = vae if self.settings.sample_prompts else None
        if self.vae is None:
            del vae
            gc.collect()

    # -- the model ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig, inject_adapter_in_model

        from .checkpoints import load_part, part_config

        torch.manual_seed(self.settings.seed)  # peft draws the LoRA's start (lora_A) from the global stream
        transformer = load_part(self.located.folders["transformer"], "transformer", self.dtype)
        transformer.requires_grad_(False)
        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.lora_alpha(), target_modules=self.modules,
                            lora_dropout=0.0, init_lora_weights=True)
        inject_adapter_in_model(config, transformer)
        self.parameters = []
        for name, parameter in transformer.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
                self.parameters.append(parameter)
        transformer.to(self.device)
        if self.settings.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        self.transformer = transformer
        self.noise_schedule = DDPMScheduler.from_config(part_config(self.located.folders["scheduler"], "scheduler"))
        self.optimizer = torch.optim.AdamW(self.parameters, lr=self.settings.learning_rate, weight_decay=1e-2)

    def lora_weights(self):
        """The LoRA trained so far, in lora_formats' canonical form (float32, CPU)."""
        from peft import get_peft_model_state_dict

        from .lora_formats import Lora, LoraWeights

        state = get_peft_model_state_dict(self.transformer)
        alpha = self.settings.lora_alpha()
        weights = {}
        for module in self.modules:
            down = state[f"{module}.lora_A.weight"].detach().to("cpu", copy=True).float()
            up = state[f"{module}.lora_B.weight"].detach().to("cpu", copy=True).float()
            weights[module] = LoraWeights(down, up, alpha)
        return Lora(weights)

    def metadata(self, step: int) -> dict[str, str]:
        from . import __version__

        fields = {"base_model": self.settings.model_name, "rank": self.settings.rank,
                  "alpha": self.settings.lora_alpha(), "steps": step, "data_sha256": self.data_hash,
                  "pictures": len(self.examples), "learning_rate": self.settings.learning_rate,
                  "batch_size": self.settings.batch_size, "resolution": self.resolution,
                  "targets": self.settings.targets, "seed": self.settings.seed, "trainer": f"pixart-sigma {__version__}"}
        return {METADATA_PREFIX + k: str(v) for k, v in fields.items()}

    def write_lora(self, path: Path, step: int) -> None:
        from .lora_formats import write_lora

        _atomic_save(lambda target: write_lora(target, self.lora_weights(), "diffusers",
                                               metadata=self.metadata(step)), path)

    # -- the order of the data -------------------------------------------------------------------------------
    def epoch_batches(self, rng) -> list[list[int]]:
        """One pass over the data: batches of one bucket each, in a seeded order."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in rng.permutation(len(self.examples)):
            by_bucket.setdefault(self.buckets[int(index)], []).append(int(index))
        batches = [indices[i:i + self.settings.batch_size] for _, indices in sorted(by_bucket.items())
                   for i in range(0, len(indices), self.settings.batch_size)]
        return [batches[int(i)] for i in rng.permutation(len(batches))]

    def steps_per_epoch(self) -> int:
        per_bucket: dict[tuple[int, int], int] = {}
        for bucket in self.buckets:
            per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
        return sum(math.ceil(n / self.settings.batch_size) for n in per_bucket.values())

    # -- one step ---------------------------------------------------------------------------------------------
    def loss(self, batch: list[int], generator) -> "Any":
        import torch
        import torch.nn.functional as F

        latents = torch.stack([self.latents[i] for i in batch]).to(self.device)
        drop = torch.rand(len(batch), generator=generator) < self.settings.caption_dropout
        texts = [self.empty if dropped else self.captions[i] for i, dropped in zip(batch, drop.tolist())]
        longest = max(kept for _, kept in texts)
        embeds = torch.zeros(len(batch), longest, texts[0][0].shape[-1], dtype=self.dtype)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, (embed, kept) in enumerate(texts):
            embeds[row, :kept], mask[row, :kept] = embed, 1
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (len(batch),),
                                  generator=generator).to(self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, timesteps)
        prediction = self.transformer(noisy.to(self.dtype), encoder_hidden_states=embeds.to(self.device),
                                      encoder_attention_mask=mask.to(self.device), timestep=timesteps,
                                      added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                      return_dict=False)[0]
        if prediction.shape[1] == 2 * latents.shape[1]:  # learned sigma: the first half is the noise
            prediction = prediction.chunk(2, dim=1)[0]
        return F.mse_loss(prediction.float(), noise)

    def learning_rate(self, step: int, total: int) -> float:
        warmup = min(MAX_WARMUP_STEPS, max(1, int(total * WARMUP_SHARE)))
        peak = self.settings.learning_rate
        if step < warmup:
            return peak * (step + 1) / warmup
        if self.settings.lr_schedule == "constant":
            return peak
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))

    # -- samples ------------------------------------------------------------------------------------------------
    def draw_samples(self, step: int) -> list[Path]:
        import torch
        from diffusers import PixArtSigmaPipeline

        from .checkpoints import load_part

        if not self.settings.sample_prompts:
            return []
        folder = self.output.with_name(self.output.stem + "-samples")
        folder.mkdir(parents=True, exist_ok=True)
        scheduler = load_part(self.located.folders["scheduler"], "scheduler", None)
        pipeline = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=self.vae, transformer=self.transformer,
                                       scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        self.transformer.eval()
        written = []
        empty, empty_kept = self.empty
        try:
            for index, (embed, kept) in enumerate(self.samples):
                generator = torch.Generator().manual_seed(self.settings.seed + index)
                width = height = self.resolution
                with torch.no_grad():
                    image = pipeline(prompt=None, negative_prompt=None, prompt_embeds=embed[None].to(self.device),
                                     prompt_attention_mask=torch.ones(1, kept, dtype=torch.long, device=self.device),
                                     negative_prompt_embeds=_padded(empty, kept)[None].to(self.device),
                                     negative_prompt_attention_mask=_mask(empty_kept, kept).to(self.device),
                                     num_inference_steps=self.settings.sample_steps, guidance_scale=4.5,
                                     width=width, height=height, use_resolution_binning=False,
                                     generator=generator).images[0]
                path = folder / f"step{step:06d}-{index}.png"
                image.save(path)
                written.append(path)
        finally:
            self.transformer.train()
        return written

    # -- state -------------------------------------------------------------------------------------------------
    def save_state(self, step: int, rng, generator, losses: list[float], batches: list[list[int]]) -> None:
        """Everything a resumed run needs to go on exactly: the LoRA, AdamW's moments, the step, the random
        streams and the rest of this pass's batches."""
        import torch

        folder = state_dir(self.output)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"key": _resume_key(self.settings, self.data_hash), "step": step,
                 "lora": {k: v.detach().cpu().clone() for k, v in zip(self._parameter_names(), self.parameters)},
                 "optimizer": self.optimizer.state_dict(), "order": rng.bit_generator.state,
                 "generator": generator.get_state(), "losses": losses, "batches": batches}
        _atomic_save(lambda target: torch.save(state, target), folder / STATE_FILE)

    def _parameter_names(self) -> list[str]:
        return [name for name, p in self.transformer.named_parameters() if p.requires_grad]

    def read_state(self) -> dict[str, Any]:
        """The saved state, checked before anything loads: a damaged or foreign file is refused with what to do."""
        path = state_dir(self.output) / STATE_FILE
        if not path.is_file() or path.is_symlink():
            raise SettingsError([f"resume: no saved state at {path} (a run saves one every save_every steps and at "
                                 "Ctrl-C); start without --resume"])
        state = _load_state_file(path, len(self.examples))
        expected = _resume_key(self.settings, self.data_hash)
        changed = [f"{k}: saved {state['key'].get(k)!r}, now {v!r}" for k, v in expected.items()
                   if state["key"].get(k) != v]
        if changed:
            raise SettingsError([f"resume: the state in {path} was saved with other settings or data ("
                                 + "; ".join(changed) + "); give the same ones, or start again without --resume"])
        return state

    def apply_state(self, state: dict[str, Any], rng, generator) -> tuple[int, list[float], list[list[int]]]:
        """The LoRA, AdamW and the random streams as saved; (step, losses, the rest of the pass's batches)."""
        import torch

        try:
            with torch.no_grad():
                for name, parameter in zip(self._parameter_names(), self.parameters):
                    saved = state["lora"][name]
                    if saved.shape != parameter.shape or saved.dtype != parameter.dtype:
                        raise ValueError(f"{name} is {tuple(saved.shape)} {saved.dtype}, the LoRA's is "
                                         f"{tuple(parameter.shape)} {parameter.dtype}")
                    parameter.copy_(saved)
                for group in state["optimizer"]["state"].values():
                    for value in group.values():
                        if isinstance(value, torch.Tensor) and value.dim() and not any(
                                value.shape == p.shape for p in self.parameters):
                            raise ValueError(f"an optimizer moment is {tuple(value.shape)}, no LoRA weight's shape")
            self.optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["order"]
            generator.set_state(state["generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise _damaged(state_dir(self.output) / STATE_FILE, f"{type(exc).__name__}: {exc}"[:300]) from None
        return state["step"], state["losses"], state["batches"]


def _damaged(path: Path, why: str) -> SettingsError:
    return SettingsError([f"resume: {path} is damaged ({why}); remove {path.parent} and start again without --resume"])


def _load_state_file(path: Path, pictures: int) -> dict[str, Any]:
    """torch.load with weights_only (no code runs), then every field's type and range checked."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, foreign or crafted: never a traceback
        raise _damaged(path, f"{type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(state, dict) or not isinstance(state.get("key"), dict):
        raise _damaged(path, "not a train-lora state")
    step, losses, batches = state.get("step"), state.get("losses"), state.get("batches")
    if not (isinstance(step, int) and 0 <= step <= MAX_TRAINING_STEPS):
        raise _damaged(path, f"step={shown(step)}")
    if not (isinstance(losses, list) and len(losses) == step and all(isinstance(v, float) for v in losses)):
        raise _damaged(path, "its losses do not match its step")
    if not (isinstance(batches, list) and all(isinstance(b, list) and b and all(
            isinstance(i, int) and 0 <= i < pictures for i in b) for b in batches)):
        raise _damaged(path, "its batches are not pictures of this data")
    if not isinstance(state.get("lora"), dict) or not all(isinstance(v, torch.Tensor) for v in state["lora"].values()):
        raise _damaged(path, "no LoRA weights")
    return state


def _has_bfloat16(device) -> bool:
    import torch

    from .devices import cpu_has_native_bfloat16

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bfloat16()


def _rgb(image):
    """RGB; transparency over white (a cut-out's background is then plain, not black)."""
    from PIL import Image

    if image.mode == "RGBA":
        plain = Image.new("RGB", image.size, (255, 255, 255))
        plain.paste(image, mask=image.getchannel("A"))
        return plain
    return image.convert("RGB")


def _padded(embeds, length: int):
    import torch

    padded = torch.zeros(length, embeds.shape[-1], dtype=embeds.dtype)
    padded[:min(length, len(embeds))] = embeds[:length]
    return padded


def _mask(kept: int, length: int):
    import torch

    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, :min(kept, length)] = 1
    return mask


def train_lora(data: Union[str, Path], output: Union[str, Path], settings: Union[LoraTrainingSettings, dict],
               *, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None,
               on_step: Optional[Callable[[int, int, float], None]] = None) -> TrainingResult:
    """Train a LoRA on the captioned pictures in `data` and write it to `output` (a .safetensors file).

    `resume`: go on from the state saved beside `output`. `stop_after`: save and stop after this many steps in
    all (as Ctrl-C does). `on_step(step, total, loss)` after each step. The data is checked first (SettingsError
    listing every problem); see the module's docstring for what is cached, saved and written.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    settings = settings if isinstance(settings, LoraTrainingSettings) else check_settings(dict(settings))
    output = Path(output).expanduser()
    _check_output(output, resume)
    started = time.monotonic()
    trainer = _Trainer(Path(data).expanduser(), output, settings)
    total = settings.total_steps(trainer.steps_per_epoch())
    saved = trainer.read_state() if resume else None  # a damaged or foreign state is refused before T5 loads
    trainer.encode_texts()
    trainer.encode_pictures()
    trainer.build()
    rng = np.random.default_rng([settings.seed, 1])
    generator = torch.Generator().manual_seed(settings.seed)
    step, losses, batches = trainer.apply_state(saved, rng, generator) if saved else (0, [], [])

    def step_file() -> Path:
        return output.with_name(f"{output.stem}-step{step:06d}.safetensors")

    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    stopped = False
    with _StopAtStepEnd() as interrupt:  # Ctrl-C ends the step first, so the saved state is a whole step's
        try:
            while step < total and not stopped:
                if not batches:
                    batches = trainer.epoch_batches(rng)
                batch = batches.pop(0)
                for group in trainer.optimizer.param_groups:
                    group["lr"] = trainer.learning_rate(step, total)
                loss = trainer.loss(batch, generator)
                if not torch.isfinite(loss):
                    advice = "" if trainer.dtype == torch.float32 else " or use dtype=float32"
                    raise SettingsError([f"the loss became {loss.item()} at step {step + 1}: lower learning_rate "
                                         f"(now {settings.learning_rate:g}){advice}"])
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainer.parameters, MAX_GRAD_NORM)
                trainer.optimizer.step()
                step += 1
                losses.append(loss.item())
                recent = losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                bar.update(1)
                if on_step is not None:
                    on_step(step, total, losses[-1])
                stopped = step < total and (interrupt.asked or (stop_after is not None and step >= stop_after))
                if step < total and (stopped or (settings.save_every and step % settings.save_every == 0)):
                    trainer.save_state(step, rng, generator, losses, batches)
                    trainer.write_lora(step_file(), step)
                if settings.sample_every and step % settings.sample_every == 0 and step < total:
                    trainer.draw_samples(step)
        finally:
            bar.close()
    if not stopped:
        try:
            trainer.write_lora(output, step)
        except Exception as exc:  # a full disk, a folder made read-only since the start
            trainer.save_state(step, rng, generator, losses, batches)
            raise SettingsError([f"cannot write {output} ({type(exc).__name__}: {exc}); the {step} steps are saved in "
                                 f"{state_dir(output)}: make room and run again with --resume to write it"]) from None
        trainer.draw_samples(step)
        shutil.rmtree(state_dir(output), ignore_errors=True)  # finished: nothing to resume
    recent = losses[-50:] or [float("nan")]
    return TrainingResult(output, step, time.monotonic() - started, sum(recent) / len(recent), stopped)


class _StopAtStepEnd:
    """Ctrl-C (SIGINT) during training asks to stop at the end of the current step; a second one stops at once
    (the state saved last stays). Only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.asked, self._previous = False, None

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __enter__(self) -> "_StopAtStepEnd":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_output(output: Path, resume: bool) -> None:
    """Before anything loads: the output is a new .safetensors file in a folder that takes files, and no earlier
    run's files would be overwritten."""
    if output.suffix != ".safetensors":
        raise SettingsError([f"output={shown(str(output))}: a LoRA is written as a .safetensors file"])
    if os.path.lexists(output):
        raise SettingsError([f"output {output} exists: choose another name, or remove it (never overwritten)"])
    state = state_dir(output) / STATE_FILE
    if not resume:
        if os.path.lexists(state):
            raise SettingsError([f"{state_dir(output)} holds a stopped run's state: add --resume to go on, or "
                                 "remove it"])
        earlier = sorted(output.parent.glob(f"{glob.escape(output.stem)}-step[0-9]*.safetensors"))
        if earlier:
            raise SettingsError([f"{earlier[0]} is an earlier run's ({len(earlier)} such files): choose another "
                                 "output name, or remove them (never overwritten)"])
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output.parent, prefix=".train-lora-", suffix=".probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise SettingsError([f"output {output}: cannot write in {output.parent} ({exc.strerror or exc}); choose a "
                             "folder you can write"]) from None
