"""Where the weights are: known checkpoint ids, local directories, the bundled demo.

Rules: only safetensors are ever loaded (never a pickle), no remote code, and each part is loaded
with the class PixArt-Sigma uses (a folder's configs cannot choose another class). A checkpoint is
complete or refused: every file a part needs must be there, be a regular file of bounded size,
and hold a config of the right shape. Hub ids are looked up in the Hugging Face cache (HF_HOME)
first; missing files are downloaded only when the hub is reachable, else the error says what to
download, how big it is and where it goes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .quiet import import_torchao_quietly, no_loading_bars
from .errors import CheckpointError, SettingsError
from .settings import DEFAULT_MODEL, shown

BASE_REPO = DEFAULT_MODEL
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "checkpoints_data" / "demo"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_CONFIG_BYTES = 1 << 20  # configs are a few KB; a bound keeps /dev/zero and friends out
MAX_TOKENIZER_BYTES = 64 << 20  # T5's tokenizer.json is 2.4 MB
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either one makes a T5 tokenizer

# The parts of a PixArt-Sigma pipeline and the config file each one needs.
PART_CONFIGS = {"transformer": "config.json", "text_encoder": "config.json", "vae": "config.json",
                "scheduler": "scheduler_config.json"}
WEIGHT_PARTS = ("transformer", "text_encoder", "vae")
SHARED_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # what the 512 and 2K releases borrow

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


# Every model_name that is not a folder: what an image's record may name, and what the errors list.
KNOWN_MODEL_NAMES = (*KNOWN_CHECKPOINTS, DEMO_NAME)


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint choice, before any weight is read.

    `model_name` is what the record stores: a known id, 'demo', or an absolute path.
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


@dataclass(frozen=True)
class Located:
    """The local folders of a checkpoint's parts, and the hub revisions they came from (None for local folders)."""

    checkpoint: Checkpoint
    folders: dict[str, Path]  # part name -> folder (transformer, text_encoder, tokenizer, vae, scheduler)
    revision: Optional[str]  # the transformer's hub commit
    base_revision: Optional[str]  # the borrowed parts' hub commit, when they come from another repo


# -- reading files we do not trust ------------------------------------------------------------
def regular_file(path: Path, limit: Optional[int] = None) -> Path:
    """`path` when it is a regular file (after links) no larger than `limit`; never opens FIFOs or devices."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path} is missing or unreadable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder): refusing to read it")
    if limit is not None and info.st_size > limit:
        raise CheckpointError(f"{path} is {info.st_size:,} bytes: at most {limit:,} are expected for this file")
    return path


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object from a bounded regular file, or CheckpointError naming the file."""
    regular_file(path, MAX_CONFIG_BYTES)
    try:
        with open(path, "rb") as stream:
            data = json.loads(stream.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _check_types(path: Path, config: dict, ints: dict[str, int] = {}, numbers: tuple[str, ...] = (),
                 int_lists: tuple[str, ...] = (), strings: tuple[str, ...] = ()) -> None:
    """Config values of the types and sizes the loaders expect, so a malformed file is an error, not a
    traceback, and an absurd one (a million layers) is not built until memory runs out."""
    problems = []
    for key, high in ints.items():
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= high):
            problems.append(f"{key}={shown(value)} (an integer from 1 to {high})")
    for key in numbers:
        value = config.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value)):
            problems.append(f"{key}={shown(value)} (a finite number)")
    for key in int_lists:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and 0 < len(value) <= 8 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value)):
            problems.append(f"{key}={shown(value)} (a list of 1 to 8 integers from 1 to 4096)")
    for key in strings:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key}={shown(value)} (a string)")
    if problems:
        raise CheckpointError(f"{path} has values of the wrong type or size: {'; '.join(problems)}")


# Bounds well above every released PixArt-Sigma part (DiT-XL/2: 28 layers, 16 heads of 72, sample 256 at
# 2K; T5-XXL: 24 layers, d_model 4096, d_ff 10240, 64 heads of 64, vocabulary 32,128; SDXL VAE: 4 blocks).
_CONFIG_TYPES = {
    "transformer": dict(ints={"sample_size": 512, "patch_size": 8, "in_channels": 64, "out_channels": 128,
                              "num_layers": 128, "attention_head_dim": 512, "num_attention_heads": 256,
                              "caption_channels": 16384, "cross_attention_dim": 16384},
                        strings=("norm_type", "_class_name")),
    "vae": dict(ints={"in_channels": 16, "out_channels": 16, "latent_channels": 64, "norm_num_groups": 512,
                      "layers_per_block": 16, "sample_size": 4096},
                numbers=("scaling_factor",), int_lists=("block_out_channels",)),
    "text_encoder": dict(ints={"d_model": 16384, "d_ff": 65536, "num_layers": 128, "num_heads": 256, "d_kv": 1024,
                               "vocab_size": 1_000_000},
                         strings=("feed_forward_proj",)),
    "scheduler": dict(ints={"num_train_timesteps": 100_000}, numbers=("beta_start", "beta_end"),
                      strings=("beta_schedule", "prediction_type", "timestep_spacing")),
}


def part_config(folder: Path, part: str) -> dict[str, Any]:
    """The checked config of one part of a pipeline."""
    path = folder / PART_CONFIGS[part]
    config = read_config(path)
    _check_types(path, config, **_CONFIG_TYPES[part])
    return config


def _check_weights(folder: Path) -> list[Path]:
    """The safetensors files of a weights folder, every one a regular file and every shard that any index
    names present; pickle-only weights are refused, never unpickled."""
    try:
        names = {entry.name for entry in os.scandir(folder)}
    except OSError as exc:
        raise CheckpointError(f"{folder} is missing or unreadable ({exc.strerror or exc})") from None
    for index_name in sorted(name for name in names if name.endswith(".safetensors.index.json")):
        index = read_config(folder / index_name)  # every index: the loader picks its own by name
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder / index_name} has no valid weight_map")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{folder / index_name} names shards outside its folder or not safetensors: {bad[:3]}")
        missing = [s for s in shards if s not in names]
        if missing:
            raise CheckpointError(f"{folder} is incomplete: {len(missing)} weight shard(s) missing, e.g. {missing[0]}")
    weights = sorted(name for name in names if name.endswith(".safetensors"))
    if weights:
        return [regular_file(folder / name) for name in weights]
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); pixart-sigma loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them to safetensors with a tool you trust."
        )
    raise CheckpointError(f"{folder} holds no weights (*.safetensors)")


def _weight_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Tensor names and shapes from the safetensors headers (no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as weights:
                for name in weights.keys():
                    shapes[name] = list(weights.get_slice(name).get_shape())
        except Exception as exc:  # a malformed header
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return shapes


def parameter_count(folder: Path) -> int:
    """Numbers in a part's safetensors files, from their headers (no weights read): its size before loading."""
    return sum(math.prod(shape) for shape in _weight_shapes(_check_weights(folder)).values())


def _blocks(shapes: dict[str, list[int]], prefix: str) -> int:
    """How many numbered blocks (`prefix{i}.`) the weights hold."""
    found = {name[len(prefix):].split(".", 1)[0] for name in shapes if name.startswith(prefix)}
    return len([index for index in found if index.isdigit()])


def _check_config_fits_weights(folder: Path, part: str, config: dict, shapes: dict[str, list[int]]) -> None:
    """The config's sizes must be the weights' sizes: a config cannot make us build a model its weights do not fill."""
    said = []  # (what the config says, what the weights hold)
    if part == "transformer":
        said.append((f"num_layers={config.get('num_layers')}", _blocks(shapes, "transformer_blocks."),
                     config.get("num_layers")))
        proj = shapes.get("pos_embed.proj.weight")
        if proj is not None and len(proj) == 4:
            heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
            if isinstance(heads, int) and isinstance(head_dim, int):
                said.append((f"num_attention_heads x attention_head_dim={heads * head_dim}", proj[0], heads * head_dim))
            said.append((f"in_channels={config.get('in_channels')}", proj[1], config.get("in_channels")))
            said.append((f"patch_size={config.get('patch_size')}", proj[2], config.get("patch_size")))
    elif part == "text_encoder":
        said.append((f"num_layers={config.get('num_layers')}", _blocks(shapes, "encoder.block."),
                     config.get("num_layers")))
        embedding = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
        if embedding is not None and len(embedding) == 2:
            said.append((f"vocab_size={config.get('vocab_size')}", embedding[0], config.get("vocab_size")))
            said.append((f"d_model={config.get('d_model')}", embedding[1], config.get("d_model")))
        for name in ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "encoder.block.0.layer.1.DenseReluDense.wi.weight"):
            if name in shapes:
                said.append((f"d_ff={config.get('d_ff')}", shapes[name][0], config.get("d_ff")))
                break
    elif part == "vae":
        channels = config.get("block_out_channels")
        if isinstance(channels, list):
            said.append((f"{len(channels)} block_out_channels", _blocks(shapes, "encoder.down_blocks."), len(channels)))
        conv_in = shapes.get("decoder.conv_in.weight")
        if conv_in is not None and len(conv_in) == 4:
            said.append((f"latent_channels={config.get('latent_channels')}", conv_in[1], config.get("latent_channels")))
    wrong = [f"{claim} but the weights hold {held}" for claim, held, expected in said
             if expected is not None and held != expected]
    if wrong:
        raise CheckpointError(f"{folder / PART_CONFIGS[part]} does not fit its weights: {'; '.join(wrong)}")


def _check_tokenizer(folder: Path) -> None:
    present = [name for name in TOKENIZER_FILES if (folder / name).exists()]
    if not present:
        raise CheckpointError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): without it every word would read as "
            "unknown and the prompt would be ignored; copy the tokenizer folder from the pipeline it was trained with")
    for path in sorted(folder.iterdir()):
        if not path.is_dir():  # an editor's or notebook's subfolder is no reason to refuse
            regular_file(path, MAX_TOKENIZER_BYTES)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            read_config(folder / name)


def check_part(folder: Path, part: str) -> None:
    """Everything one part needs is present and well-formed (weights are not read)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing: a PixArt-Sigma pipeline needs its {part} folder")
    if part == "tokenizer":
        _check_tokenizer(folder)
        return
    config = part_config(folder, part)
    if part == "transformer" and "Transformer2DModel" not in str(config.get("_class_name", "")):
        raise CheckpointError(f"{folder / 'config.json'} is not a PixArt transformer config "
                              f"(_class_name={config.get('_class_name')!r})")
    if part in WEIGHT_PARTS:
        _check_config_fits_weights(folder, part, config, _weight_shapes(_check_weights(folder)))


def _check_pipeline(path: Path, parts: tuple[str, ...]) -> None:
    index = read_config(path / "model_index.json")
    missing = [part for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler") if part not in index]
    if missing:
        raise CheckpointError(f"{path}/model_index.json lacks {', '.join(missing)}: not a PixArt-Sigma pipeline")
    for part in parts:
        check_part(path / part, part)


def _vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _transformer_dir(path: Path) -> Optional[Path]:
    """The folder of a transformer-only checkpoint: `path/transformer` or `path` itself."""
    for candidate in (path / "transformer", path):
        if (candidate / "config.json").exists():
            config = read_config(candidate / "config.json")
            if "Transformer2DModel" in str(config.get("_class_name", "")):
                return candidate
    return None


def _native_size(sample_size: Any, scale: int) -> Optional[int]:
    return sample_size * scale if isinstance(sample_size, int) else None


def _local_checkpoint(path: Path) -> Checkpoint:
    name = DEMO_NAME if path == DEMO_DIR.resolve() else str(path)
    if (path / "model_index.json").exists():
        _check_pipeline(path, ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"))
        sample = part_config(path / "transformer", "transformer").get("sample_size")
        factor = _vae_scale_factor(part_config(path / "vae", "vae"))
        return Checkpoint(name, str(path), None, _native_size(sample, factor))
    transformer = _transformer_dir(path)
    if transformer is None:
        raise CheckpointError(
            f"model_name={str(path)!r}: the directory has neither model_index.json (a full diffusers pipeline) "
            "nor a transformer config.json (a transformer-only checkpoint such as the 512 or 2K release)"
        )
    check_part(transformer, "transformer")
    sample = part_config(transformer, "transformer").get("sample_size")
    # Transformer-only checkpoints borrow T5, VAE (scale 8) and tokenizer from the 1024 pipeline.
    return Checkpoint(name, BASE_REPO, str(path), _native_size(sample, 8))


def resolve_checkpoint(model_name: str) -> Checkpoint:
    """Check a model_name without reading weights: a known id, 'demo', or a local directory."""
    if model_name == DEMO_NAME:
        if not (DEMO_DIR / "model_index.json").is_file():
            raise CheckpointError(f"the bundled demo model is missing from {DEMO_DIR}: reinstall pixart-sigma")
        return _local_checkpoint(DEMO_DIR.resolve())
    known = KNOWN_CHECKPOINTS.get(model_name)
    if known:
        if known.transformer_only:
            return Checkpoint(model_name, BASE_REPO, known.repo_id, known.native_size)
        return Checkpoint(model_name, known.repo_id, None, known.native_size)
    unknown = SettingsError([
        f"model_name={model_name!r} is neither a known checkpoint nor a directory: use one of "
        f"{', '.join(KNOWN_MODEL_NAMES)}, or the path of a diffusers-format directory"
    ])
    try:
        path = Path(model_name).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError) as exc:  # a name too long for the file system, an unknown ~user
        raise SettingsError([f"model_name={model_name[:80]!r}{'...' if len(model_name) > 80 else ''} "
                             f"cannot be a directory here ({getattr(exc, 'strerror', None) or exc}); use one of "
                             f"{', '.join(KNOWN_MODEL_NAMES)}, or the path of a "
                             "diffusers-format directory"]) from None
    if not is_dir:
        raise unknown
    return _local_checkpoint(path.resolve())


# -- hub ids ------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hint(repos: list[tuple[str, float, list[str]]]) -> str:
    from huggingface_hub import constants

    lines = [f"  hf download {repo} --include {' '.join(repr(p) for p in patterns)}   (about {gb:g} GB)"
             for repo, gb, patterns in repos]
    return (
        "Download them once on a machine with internet access:\n" + "\n".join(lines) +
        f"\nThey go to the Hugging Face cache at {constants.HF_HUB_CACHE} (set HF_HOME to move it); "
        "after that pixart-sigma works offline."
    )


def _cached_snapshot(repo_id: str, patterns: list[str]) -> Optional[Path]:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        return None


def _locate_repo(repo_id: str, patterns: list[str], parts: tuple[str, ...], local_only: bool) -> Path:
    """A hub repo's complete snapshot folder: from the cache, downloading what is missing only when allowed."""
    from huggingface_hub import snapshot_download

    def check(folder: Path) -> None:
        if "transformer" in parts and parts == ("transformer",):
            check_part(folder / "transformer", "transformer")
        else:
            _check_pipeline(folder, parts)

    snapshot = _cached_snapshot(repo_id, patterns)
    problem: Optional[Exception] = None
    if snapshot is not None:
        try:
            check(snapshot)
            return snapshot
        except CheckpointError as exc:  # partly downloaded: fetch the rest if we may
            problem = exc
    if local_only or _hub_offline():
        raise CheckpointError(str(problem) if problem else f"{repo_id} is not in the cache")
    snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns))
    check(snapshot)
    return snapshot


def _revision(folder: Path) -> Optional[str]:
    """The commit of a hub snapshot folder (…/snapshots/<commit>), None for other folders."""
    name = folder.name
    return name if folder.parent.name == "snapshots" and len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


SHARED_PATTERNS = [p for p in PIPELINE_PATTERNS if not p.startswith("transformer/")]


def _needed(checkpoint: Checkpoint) -> list[tuple[str, float, list[str], tuple[str, ...]]]:
    """The hub repos a checkpoint reads: (repo, GB, patterns, parts)."""
    needed = []
    if not Path(checkpoint.pipeline_source).is_dir():
        if checkpoint.transformer_source:
            needed.append((checkpoint.pipeline_source, BASE_WITHOUT_TRANSFORMER_GB, SHARED_PATTERNS, SHARED_PARTS))
        else:
            needed.append((checkpoint.pipeline_source, KNOWN_CHECKPOINTS[BASE_REPO].download_gb, PIPELINE_PATTERNS,
                           ("transformer",) + SHARED_PARTS))
    if checkpoint.transformer_source and not Path(checkpoint.transformer_source).is_dir():
        needed.append((checkpoint.transformer_source, KNOWN_CHECKPOINTS[checkpoint.transformer_source].download_gb,
                       TRANSFORMER_PATTERNS, ("transformer",)))
    return needed


def _in_cache(repo_id: str, patterns: list[str], parts: tuple[str, ...]) -> bool:
    try:
        _locate_repo(repo_id, patterns, parts, local_only=True)
        return True
    except CheckpointError:
        return False


def download_cost(checkpoint: Checkpoint) -> tuple[float, float]:
    """GB still to download for a checkpoint, and how many of them are the shared base (T5, VAE, tokenizer:
    fetched once for all three releases). Reads only the local cache."""
    total = shared = 0.0
    for repo_id, gb, patterns, parts in _needed(checkpoint):
        if _in_cache(repo_id, patterns, parts):
            continue
        if parts == ("transformer",):
            total += gb
        elif _in_cache(repo_id, SHARED_PATTERNS, SHARED_PARTS):  # the base is here, its transformer is not
            total += gb - BASE_WITHOUT_TRANSFORMER_GB
        else:
            total, shared = total + gb, shared + BASE_WITHOUT_TRANSFORMER_GB
    return round(total, 1), round(shared, 1)


def locate(checkpoint: Checkpoint, local_only: bool = False) -> Located:
    """Local folders of every part of a checkpoint; `local_only` never downloads."""
    needed = _needed(checkpoint)
    found: dict[str, Path] = {}
    missing = []
    for repo_id, gb, patterns, parts in needed:
        try:
            found[repo_id] = _locate_repo(repo_id, patterns, parts, local_only)
        except Exception as exc:  # hub unreachable, offline, auth, incomplete: all end in the same advice
            missing.append((repo_id, gb, patterns, exc))
    if missing:
        reason = "; ".join(f"{repo}: {exc}".splitlines()[0] for repo, _, _, exc in missing)
        raise CheckpointError(
            f"model_name={checkpoint.model_name!r} needs weights that are not (all) on this machine and could not be "
            f"downloaded ({reason}).\n" + download_hint([(repo, gb, patterns) for repo, gb, patterns, _ in missing])
        )
    pipeline_dir = found.get(checkpoint.pipeline_source, Path(checkpoint.pipeline_source))
    folders = {part: pipeline_dir / part for part in SHARED_PARTS}
    revision = base_revision = _revision(pipeline_dir)
    if checkpoint.transformer_source:
        root = found.get(checkpoint.transformer_source, Path(checkpoint.transformer_source))
        transformer_dir = _transformer_dir(root)
        if transformer_dir is None:
            raise CheckpointError(f"{root} holds no transformer/config.json")
        check_part(transformer_dir, "transformer")
        folders["transformer"] = transformer_dir
        revision = _revision(root)
    else:
        folders["transformer"] = pipeline_dir / "transformer"
        base_revision = None
    return Located(checkpoint, folders, revision, base_revision)


def is_available(model_name: str) -> bool:
    """True when every file a checkpoint needs is on this machine (nothing is downloaded to find out)."""
    try:
        locate(resolve_checkpoint(model_name), local_only=True)
        return True
    except (CheckpointError, SettingsError):
        return False


@dataclass(frozen=True)
class CheckpointStatus:
    """What `pixart-sigma models` shows for one checkpoint."""

    model_name: str
    native_size: int
    download_gb: float  # what downloading it costs now (0 when complete), the shared base included when missing
    shared_gb: float  # of which the T5, VAE and tokenizer all three releases share (0 when already here)
    complete: bool  # every file it needs is on this machine
    folders: tuple[Path, ...]  # where its parts are (empty when not complete)
    size_bytes: int  # bytes on disk of those folders
    problem: Optional[str]  # why it is not complete, with the download command


def checkpoint_statuses() -> list[CheckpointStatus]:
    """Each known checkpoint and the bundled demo: complete or not, its size on disk and where it is."""
    names = [DEMO_NAME] + list(KNOWN_CHECKPOINTS)
    statuses = []
    for name in names:
        checkpoint = resolve_checkpoint(name)
        try:
            located = locate(checkpoint, local_only=True)
        except CheckpointError as exc:
            statuses.append(CheckpointStatus(name, checkpoint.native_size or 0, *download_cost(checkpoint),
                                             False, (), 0, str(exc)))
            continue
        folders = tuple(sorted(set(located.folders.values())))
        statuses.append(CheckpointStatus(name, checkpoint.native_size or 0, 0.0, 0.0, True,
                                         folders, sum(folder_bytes(folder) for folder in folders), None))
    return statuses


# -- loading the parts --------------------------------------------------------------------------
@contextmanager
def loading_guard(folder: Path, what: str):
    """Turn any loader failure (wrong shapes, types the checks missed) into a CheckpointError naming the folder."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load the {what} from {folder}: {type(exc).__name__}: {exc}"[:2000]) from None


def vae_dtype(dtype):
    """The VAE's dtype for a model in `dtype`: the SDXL VAE overflows in float16 (NaN, black images), so float32 then."""
    import torch

    return torch.float32 if dtype == torch.float16 else dtype


def load_part(folder: Path, part: str, dtype):
    """One pipeline part, with PixArt-Sigma's own class for it (the folder's configs cannot pick another)."""
    check_part(folder, part)
    import_torchao_quietly()  # before diffusers imports it (it does when torchao is installed)
    with loading_guard(folder, part), no_loading_bars():
        if part == "transformer":
            from diffusers import PixArtTransformer2DModel

            return PixArtTransformer2DModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_pretrained(folder, dtype=vae_dtype(dtype), use_safetensors=True)
        if part == "text_encoder":
            from transformers import T5EncoderModel

            return T5EncoderModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        if part == "tokenizer":
            from transformers import T5Tokenizer

            return T5Tokenizer.from_pretrained(folder)
        if part == "scheduler":
            from diffusers import DPMSolverMultistepScheduler

            return DPMSolverMultistepScheduler.from_config(part_config(folder, "scheduler"))
    raise ValueError(f"unknown part {part!r}")


def load_pipeline(checkpoint: Checkpoint, dtype):
    """Read a whole checkpoint into a diffusers PixArtSigmaPipeline on the CPU, in `dtype` (no sharing)."""
    from diffusers import PixArtSigmaPipeline

    located = locate(checkpoint)
    parts = {part: load_part(folder, part, dtype) for part, folder in located.folders.items()}
    return PixArtSigmaPipeline(**parts)


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under a folder (links followed once), for `pixart-sigma models`."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total
