"""Where the weights are: known checkpoint ids, local directories, the bundled demo.

Rules: only safetensors are ever loaded (never a pickle), no remote code, and hub ids are
looked up in the Hugging Face cache (HF_HOME) first. A download is tried only when the files
are missing and the hub is not switched off; when it cannot happen, the error says what to
download, how big it is and where it goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .settings import DEFAULT_MODEL, SettingsError

BASE_REPO = DEFAULT_MODEL
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "checkpoints_data" / "demo"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Files of a full pipeline repo that we need: configs, tokenizer, safetensors weights.
PIPELINE_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*", "*/config.json",
                     "text_encoder/*.safetensors", "text_encoder/*.json",
                     "transformer/*.safetensors", "vae/*.safetensors"]
TRANSFORMER_PATTERNS = ["transformer/config.json", "transformer/*.safetensors"]
BASE_WITHOUT_TRANSFORMER_GB = 19.5  # the 1024 repo less its transformer: what the 512 and 2K releases borrow


@dataclass(frozen=True)
class KnownCheckpoint:
    repo_id: str
    transformer_only: bool
    native_size: int
    download_gb: float


KNOWN_CHECKPOINTS = {
    known.repo_id: known
    for known in (
        KnownCheckpoint("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", False, 1024, 21.9),
        KnownCheckpoint("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", True, 512, 2.4),
        KnownCheckpoint("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", True, 2048, 2.4),
    )
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or trusted. The message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint choice, before any weight is read.

    `pipeline_source` is a hub id or directory of a full pipeline (T5, VAE, tokenizer,
    scheduler, maybe a transformer); `transformer_source`, when set, is a hub id or
    directory whose transformer replaces the pipeline's (the 512 and 2K releases).
    """

    model_name: str
    pipeline_source: str
    transformer_source: Optional[str] = None
    native_size: Optional[int] = None

    @property
    def key(self) -> tuple[str, Optional[str]]:
        return (self.pipeline_source, self.transformer_source)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _check_safetensors(folder: Path) -> None:
    """A weights folder must hold safetensors; pickle-only weights are refused, never unpickled."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); pixart-sigma loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them to safetensors with a tool you trust."
        )
    raise CheckpointError(f"{folder} holds no weights (*.safetensors)")


def _vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _transformer_dir(path: Path) -> Optional[Path]:
    """The folder of a transformer-only checkpoint: `path/transformer` or `path` itself."""
    for candidate in (path / "transformer", path):
        config = candidate / "config.json"
        if config.is_file() and "Transformer2DModel" in str(_read_json(config).get("_class_name", "")):
            return candidate
    return None


def _local_checkpoint(model_name: str, path: Path) -> Checkpoint:
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        missing = [part for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler") if part not in index]
        if missing:
            raise CheckpointError(f"{path}/model_index.json lacks {', '.join(missing)}: not a PixArt-Sigma pipeline")
        for part in ("transformer", "text_encoder", "vae"):
            _check_safetensors(path / part)
        sample = _read_json(path / "transformer" / "config.json").get("sample_size")
        factor = _vae_scale_factor(_read_json(path / "vae" / "config.json"))
        return Checkpoint(model_name, str(path), None, sample * factor if sample else None)
    transformer = _transformer_dir(path)
    if transformer is None:
        raise CheckpointError(
            f"model_name={model_name!r}: the directory has neither model_index.json (a full diffusers pipeline) "
            "nor a transformer config.json (a transformer-only checkpoint such as the 512 or 2K release)"
        )
    _check_safetensors(transformer)
    sample = _read_json(transformer / "config.json").get("sample_size")
    # Transformer-only checkpoints borrow T5, VAE (scale 8) and tokenizer from the 1024 pipeline.
    return Checkpoint(model_name, BASE_REPO, str(path), sample * 8 if sample else None)


def resolve_checkpoint(model_name: str) -> Checkpoint:
    """Check a model_name without reading weights: a known id, 'demo', or a local directory."""
    if model_name == DEMO_NAME:
        if not (DEMO_DIR / "model_index.json").is_file():
            raise CheckpointError(f"the bundled demo model is missing from {DEMO_DIR}: reinstall pixart-sigma")
        return _local_checkpoint(DEMO_NAME, DEMO_DIR)
    known = KNOWN_CHECKPOINTS.get(model_name)
    if known:
        if known.transformer_only:
            return Checkpoint(model_name, BASE_REPO, known.repo_id, known.native_size)
        return Checkpoint(model_name, known.repo_id, None, known.native_size)
    path = Path(model_name).expanduser()
    if path.is_dir():
        return _local_checkpoint(model_name, path.resolve())
    raise SettingsError([
        f"model_name={model_name!r} is neither a known checkpoint nor a directory: use one of "
        f"{', '.join(list(KNOWN_CHECKPOINTS) + [DEMO_NAME])}, or the path of a diffusers-format directory"
    ])


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download_hint(repos: list[tuple[str, float, list[str]]]) -> str:
    from huggingface_hub import constants

    lines = [f"  hf download {repo} --include {' '.join(repr(p) for p in patterns)}   (about {gb:g} GB)"
             for repo, gb, patterns in repos]
    return (
        "Download them once on a machine with internet access:\n" + "\n".join(lines) +
        f"\nThey go to the Hugging Face cache at {constants.HF_HUB_CACHE} (set HF_HOME to move it); "
        "after that pixart-sigma works offline."
    )


def _locate_repo(repo_id: str, patterns: list[str], local_only: bool = False) -> Path:
    """A hub repo's snapshot folder from the cache, downloading it only when allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if local_only:
            raise
    if _hub_offline():
        raise LocalEntryNotFoundError(f"{repo_id} is not in the cache and HF_HUB_OFFLINE is set")
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def locate(checkpoint: Checkpoint, local_only: bool = False) -> tuple[Path, Optional[Path]]:
    """Local folders of (pipeline, transformer-or-None) for a checkpoint; `local_only` never downloads."""
    needed = []
    if not Path(checkpoint.pipeline_source).is_dir():
        gb = BASE_WITHOUT_TRANSFORMER_GB if checkpoint.transformer_source else KNOWN_CHECKPOINTS[BASE_REPO].download_gb
        needed.append((checkpoint.pipeline_source, gb))
    if checkpoint.transformer_source and not Path(checkpoint.transformer_source).is_dir():
        needed.append((checkpoint.transformer_source, KNOWN_CHECKPOINTS[checkpoint.transformer_source].download_gb))
    found: dict[str, Path] = {}
    missing = []
    for repo_id, gb in needed:
        patterns = TRANSFORMER_PATTERNS if repo_id == checkpoint.transformer_source else (
            [p for p in PIPELINE_PATTERNS if not p.startswith("transformer/")] if checkpoint.transformer_source
            else PIPELINE_PATTERNS)
        try:
            found[repo_id] = _locate_repo(repo_id, patterns, local_only)
        except Exception as exc:  # hub unreachable, offline, auth: all end in the same advice
            missing.append((repo_id, gb, patterns, exc))
    if missing:
        reason = "; ".join(f"{repo}: {type(exc).__name__}: {exc}".splitlines()[0] for repo, _, _, exc in missing)
        raise CheckpointError(
            f"model_name={checkpoint.model_name!r} needs weights that are not on this machine and could not be "
            f"downloaded ({reason}).\n" + _download_hint([(repo, gb, patterns) for repo, gb, patterns, _ in missing])
        )
    pipeline_dir = found.get(checkpoint.pipeline_source, Path(checkpoint.pipeline_source))
    transformer_dir = None
    if checkpoint.transformer_source:
        root = found.get(checkpoint.transformer_source, Path(checkpoint.transformer_source))
        transformer_dir = _transformer_dir(root)
        if transformer_dir is None:
            raise CheckpointError(f"{root} holds no transformer/config.json")
        _check_safetensors(transformer_dir)
    return pipeline_dir, transformer_dir


def is_available(model_name: str) -> bool:
    """True when a checkpoint's weights are on this machine (nothing is downloaded to find out)."""
    try:
        locate(resolve_checkpoint(model_name), local_only=True)
        return True
    except (CheckpointError, SettingsError):
        return False


def load_pipeline(checkpoint: Checkpoint, dtype):
    """Read a checkpoint into a diffusers PixArtSigmaPipeline on the CPU, in `dtype`."""
    import torch
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    pipeline_dir, transformer_dir = locate(checkpoint)
    extra = {}
    if transformer_dir is not None:
        extra["transformer"] = PixArtTransformer2DModel.from_pretrained(
            transformer_dir, dtype=dtype, use_safetensors=True)
    try:
        pipeline = PixArtSigmaPipeline.from_pretrained(
            pipeline_dir, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise CheckpointError(f"cannot load model_name={checkpoint.model_name!r} from {pipeline_dir}: {exc}") from None
    if dtype == torch.float16:
        # The SDXL VAE overflows in float16 (NaN, black images): keep it in float32.
        pipeline.vae.to(torch.float32)
    return pipeline

