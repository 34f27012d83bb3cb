"""LoRAs per call: a name found in the LoRA folder, each file hashed and read once, a set fused for a call.

- `resolve_lora`: a name is looked up in the LoRA folder (`$PIXART_SIGMA_HOME/loras`, or `lora_dir`) by a
  file's stem or a PEFT folder's name, never outside the folder; a value with a / in it is a path
  (where paths are allowed). An ambiguous or missing name is refused, listing what there is.
- `sha256_of`: each LoRA file's SHA-256 (a PEFT folder: of its adapter_model.safetensors), kept by
  (path, mtime, size) so a file is hashed once; `find_by_hash` finds a record's LoRA in the folder by it.
- `prepare_loras`: a call's `loras` setting resolved, hashed and read (lora_formats), cached by
  (path, mtime, size, SHA-256) so repeated calls do not read again.
- `fuse`: the set applied to a transformer for the call, W += sum(scale x delta), computed in float32 and
  rounded once to the weight's dtype, on its device. Each touched weight's original is copied to the CPU
  once; a different set, scale 0 or no LoRAs puts the originals back (bit for bit), and the same set
  again changes nothing. The engine calls it inside its device turn, so calls never see another's set.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .checkpoints import regular_file
from .errors import CheckpointError, SettingsError
from .home import default_lora_dir
from .lora_formats import MAX_LORA_BYTES, PEFT_CONFIG, PEFT_WEIGHTS, Lora, read_lora
from .settings import is_plain_lora_name, shown

LORA_SUFFIX = ".safetensors"
MAX_FOLDER_ENTRIES = 10_000  # files and folders looked at in the LoRA folder: a LoRA folder, not a disk
MAX_FOLDER_DEPTH = 4  # subfolders looked into (people sort LoRAs by base model or style)
CACHED_LORAS = 8  # LoRAs kept read (one call applies at most settings.MAX_LORAS)
SHOWN_NAMES = 12  # a "not found" error lists this many names of the folder
HASH_BLOCK = 1 << 20
STATE_ATTRIBUTE = "_pixart_sigma_lora_state"  # on a transformer: the originals and the set fused now


# -- names and files -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraFile:
    """A LoRA on disk: the name an image records (a file's stem, a PEFT folder's name) and what is read."""

    name: str
    path: Path  # a .safetensors file or a PEFT folder

    @property
    def weights(self) -> Path:
        """The file hashed: the file itself, or a PEFT folder's adapter_model.safetensors."""
        return self.path / PEFT_WEIGHTS if self.path.is_dir() else self.path


def lora_name(path: Path) -> str:
    """The name a LoRA file or folder is known by: its stem, or the folder's name."""
    return path.name if path.is_dir() else path.name.removesuffix(LORA_SUFFIX)


def folder_loras(folder: Path) -> list[Path]:
    """The LoRAs in a folder and its subfolders: *.safetensors files and PEFT folders (not looked into), sorted.

    Hidden files and folders are skipped; linked folders are not followed; at most MAX_FOLDER_ENTRIES
    entries and MAX_FOLDER_DEPTH levels are looked at.
    """
    found: list[Path] = []
    seen = 0
    for root, folders, files in os.walk(folder):
        root_path = Path(root)
        depth = len(root_path.relative_to(folder).parts)
        seen += len(folders) + len(files)
        if seen > MAX_FOLDER_ENTRIES:
            raise SettingsError([f"the LoRA folder {folder} holds more than {MAX_FOLDER_ENTRIES:,} entries: keep "
                                 "LoRAs in a folder of their own (lora_dir / --lora-dir)"])
        peft = sorted(name for name in folders if (root_path / name / PEFT_CONFIG).is_file())
        found += [root_path / name for name in peft if not name.startswith(".")]
        folders[:] = sorted(name for name in folders
                            if name not in peft and not name.startswith(".") and depth < MAX_FOLDER_DEPTH)
        found += [root_path / name for name in sorted(files)
                  if name.endswith(LORA_SUFFIX) and not name.startswith(".")]
    return sorted(found)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def resolve_lora(name: str, folder: Optional[Path] = None, allow_paths: bool = True, where: str = "loras") -> LoraFile:
    """The LoRA a `loras` name means: a name in `folder` (default: the LoRA folder), or a path (with a / in it)
    where `allow_paths`. SettingsError naming `where`, the value, the rule and what is valid."""
    folder = Path(folder) if folder is not None else default_lora_dir()
    if not is_plain_lora_name(name):
        if not allow_paths:
            raise SettingsError([f"{where}={shown(name)} is not valid here: name a LoRA of the LoRA folder "
                                 f"({folder}) by its name, without / or \\ and not starting with a dot"])
        path = Path(name).expanduser()
        if not (path.is_file() or path.is_dir()):
            raise SettingsError([f"{where}={shown(name)}: no such file or folder (a name with / in it is a path; "
                                 f"a name without one is looked up in {folder})"])
        return LoraFile(lora_name(path), path)
    stem = name.removesuffix(LORA_SUFFIX)
    if not folder.is_dir():
        raise SettingsError([f"{where}={shown(name)}: the LoRA folder {folder} does not exist: put LoRAs there"
                             + (", name another folder (lora_dir, --lora-dir), or give the LoRA's path" if allow_paths
                                else "")])
    loras = folder_loras(folder)
    matches = [path for path in loras if lora_name(path) == stem]
    if not matches:
        names = sorted({lora_name(path) for path in loras})
        listed = ", ".join(names[:SHOWN_NAMES]) + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES
                                                   else "")
        raise SettingsError([f"{where}={shown(name)} is not in the LoRA folder {folder}: "
                             + (f"it holds {listed}" if names else "it holds no LoRA (*.safetensors or PEFT folders)")])
    if len(matches) > 1:
        places = ", ".join(str(path.relative_to(folder)) for path in matches)
        raise SettingsError([f"{where}={shown(name)} is ambiguous: the LoRA folder {folder} holds {places}; "
                             + ("rename one, or give the path" if allow_paths else "rename one")])
    if not _inside(matches[0], folder):
        raise SettingsError([f"{where}={shown(name)}: {matches[0]} links outside the LoRA folder {folder}; a name "
                             "only finds LoRAs inside it" + (" (give the path to use that file)" if allow_paths else "")])
    return LoraFile(stem, matches[0])


# -- hashes ------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> SHA-256


def _identity(path: Path) -> tuple[str, int, int]:
    info = regular_file(path, MAX_LORA_BYTES).stat()
    return str(path.resolve()), info.st_mtime_ns, info.st_size


def sha256_of(path: Path) -> str:
    """The SHA-256 of a LoRA file, hashed once per (path, mtime, size)."""
    key = _identity(path)
    with _lock:
        known = _hashes.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    with _lock:
        _hashes[key] = digest.hexdigest()
    return digest.hexdigest()


def find_by_hash(digest: str, folder: Optional[Path] = None) -> Optional[LoraFile]:
    """The LoRA of the folder whose SHA-256 is `digest` (or starts with it: A1111's short hash), or None."""
    folder = Path(folder) if folder is not None else default_lora_dir()
    if not folder.is_dir():
        return None
    for path in folder_loras(folder):
        lora = LoraFile(lora_name(path), path)
        try:
            if _inside(path, folder) and sha256_of(lora.weights).startswith(digest):
                return lora
        except CheckpointError:
            continue  # a file that cannot be read is not the one
    return None


def recorded_loras(recorded: Sequence[Mapping[str, Any]], folder: Optional[Path] = None) -> list[dict[str, Any]]:
    """A record's LoRAs found in the LoRA folder by their SHA-256 (a record's name is never opened):
    the `loras` setting that makes the image again. SettingsError naming each one missing."""
    folder = Path(folder) if folder is not None else default_lora_dir()
    settings, missing = [], []
    for item in recorded:
        found = find_by_hash(item["sha256"], folder)
        if found is None:
            missing.append(f"{item['name']} (SHA-256 {item['sha256']})")
        else:
            settings.append({"name": str(found.path), "scale": item["scale"]})
    if missing:
        raise SettingsError([f"the image was made with LoRAs that the LoRA folder {folder} does not hold: "
                             f"{', '.join(missing)}; put them there (found by their SHA-256), or name another "
                             "folder (--lora-dir)"])
    return settings


# -- reading, cached ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a call, read: what is fused and what the image records."""

    name: str
    scale: float
    sha256: str
    lora: Lora = field(repr=False)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "sha256": self.sha256}


_read: OrderedDict[tuple, Lora] = OrderedDict()  # least recently used first


def read_cached(lora: LoraFile, transformer_config: Mapping) -> tuple[Lora, str]:
    """The LoRA read for this transformer and its SHA-256; read again only when the file changed."""
    before = _identity(lora.weights)
    digest = sha256_of(lora.weights)
    config = json.dumps({k: v for k, v in dict(transformer_config).items() if not k.startswith("_")},
                        sort_keys=True, default=str)
    key = (str(lora.path.resolve()), *before[1:], digest, config)
    with _lock:
        cached = _read.get(key)
        if cached is not None:
            _read.move_to_end(key)
            return cached, digest
    read = read_lora(lora.path, transformer_config)
    if _identity(lora.weights) != before:
        raise CheckpointError(f"{lora.weights} changed while it was read: try again once it is written")
    with _lock:
        _read[key] = read
        while len(_read) > CACHED_LORAS:
            _read.popitem(last=False)
    return read, digest


def prepare_loras(loras: Sequence[Any], transformer_config: Mapping, folder: Optional[Path] = None,
                  allow_paths: bool = True) -> list[LoraUse]:
    """A call's checked `loras` setting (LoraSetting items, or their dicts) resolved, hashed and read; every problem at once."""
    uses, problems = [], []
    for index, item in enumerate(loras):
        name, scale = (item["name"], item["scale"]) if isinstance(item, Mapping) else (item.name, item.scale)
        where = f"loras.{index}.name"
        try:
            found = resolve_lora(name, folder, allow_paths, where)
            read, digest = read_cached(found, transformer_config)
            if read.text_encoder:
                raise SettingsError([f"{where}={shown(name)}: {found.weights} has a text-encoder (T5) part "
                                     f"({len(read.text_encoder)} modules, e.g. {next(iter(read.text_encoder))}): "
                                     "LoRAs are applied to the transformer only, and a changed T5 would also make "
                                     "every cached prompt embedding wrong; use a file without its lora_te_ / "
                                     "text_encoder keys"])
            uses.append(LoraUse(found.name, float(scale), digest, read))
        except SettingsError as exc:
            problems += exc.problems
        except CheckpointError as exc:
            problems.append(f"{where}={shown(name)} cannot be used: {exc}")
    if problems:
        raise SettingsError(problems)
    return uses


# -- fusing a set into a transformer ----------------------------------------------------------------------
@dataclass
class _FusedState:
    originals: dict[str, Any] = field(default_factory=dict)  # module -> its weight before any LoRA, on the CPU
    changed: set[str] = field(default_factory=set)  # modules whose weight differs from the original now
    key: Optional[tuple] = ()  # the set fused now, by (SHA-256, scale); None after a failed fuse


def fused_key(uses: Sequence[LoraUse]) -> tuple:
    """What a fused set is known by: each LoRA's SHA-256 and scale, in order (scale 0 applies nothing)."""
    return tuple((use.sha256, use.scale) for use in uses if use.scale != 0)


def _summed_deltas(uses: Sequence[LoraUse]) -> dict[str, Any]:
    """module -> sum of scale x delta over the set, in float32 on the CPU."""
    deltas: dict[str, Any] = {}
    for use in uses:
        if use.scale == 0:
            continue
        for module, weights in use.lora.transformer.items():
            change = weights.delta() * use.scale
            deltas[module] = deltas[module] + change if module in deltas else change
    return deltas


def _weight(transformer, module: str):
    weight = transformer.get_submodule(module).weight
    if not weight.is_floating_point():
        raise SettingsError([f"loras: the transformer's {module} holds {weight.dtype} weights (a quantized model): "
                             "LoRAs are fused into float weights only; load the model in bfloat16, float16 or float32"])
    return weight


def fuse(transformer, uses: Sequence[LoraUse]) -> None:
    """Make the transformer's weights the originals plus this set's changes; the same set again does nothing.

    Call it while nothing else runs on the transformer (the engine's device turn).
    """
    import torch

    key = fused_key(uses)
    state = transformer.__dict__.setdefault(STATE_ATTRIBUTE, _FusedState())
    if key == state.key:
        return
    deltas = _summed_deltas(uses)
    weights = {module: _weight(transformer, module) for module in state.changed | set(deltas)}
    with torch.no_grad():
        for module in deltas:  # the original of every weight a LoRA touches, copied once
            if module not in state.originals:
                state.originals[module] = weights[module].detach().to("cpu", copy=True)
        state.key = None  # until done: a failure part way makes the next call put every original back
        state.changed |= set(deltas)
        for module in state.changed - set(deltas):
            weights[module].copy_(state.originals[module])
        for module, delta in deltas.items():
            weight = weights[module]
            original = state.originals[module].to(weight.device, torch.float32)
            weight.copy_((original + delta.to(weight.device)).to(weight.dtype))
    state.changed, state.key = set(deltas), key


def fused_set(transformer) -> tuple:
    """The (SHA-256, scale) pairs fused into this transformer now (() for its base weights)."""
    state = transformer.__dict__.get(STATE_ATTRIBUTE)
    return state.key if state is not None and state.key is not None else ()


__all__ = ["LoraFile", "LoraUse", "resolve_lora", "folder_loras", "lora_name", "sha256_of", "find_by_hash",
           "recorded_loras", "read_cached", "prepare_loras", "fuse", "fused_key", "fused_set"]


# -- the folder, listed ------------------------------------------------------------------------------------
MAX_PROBLEM_CHARS = 2000  # of why a LoRA cannot be read, in a listing (our messages are far shorter)


@dataclass(frozen=True)
class LoraListing:
    """One LoRA of a folder as a listing shows it; `problem` says why it cannot be used (then the rest is empty)."""

    name: str
    path: str  # relative to the folder
    layout: str = ""
    ranks: tuple[int, ...] = ()
    targets: int = 0
    bytes: int = 0
    sha256: str = ""
    problem: Optional[str] = None


def list_loras(folder: Optional[Path] = None, transformer_config: Optional[Mapping] = None,
               model_name: Optional[str] = None) -> list[LoraListing]:
    """Every LoRA of the folder (default: the LoRA folder), read against a transformer's config (or the one of
    `model_name`, a local checkpoint, default the default model): name, layout, ranks, targets, size and SHA-256,
    or why it cannot be read. A missing folder lists nothing. Reads are cached like a call's."""
    from . import PixArtSigmaError
    from .checkpoints import locate, part_config, resolve_checkpoint
    from .settings import DEFAULT_MODEL

    folder = Path(folder) if folder is not None else default_lora_dir()
    if not folder.is_dir():
        return []
    if transformer_config is None:
        name = model_name or DEFAULT_MODEL
        located = locate(resolve_checkpoint(name), local_only=True)
        transformer_config = part_config(located.folders["transformer"], "transformer")
    listed = []
    for path in folder_loras(folder):
        lora = LoraFile(lora_name(path), path)
        shown_path = str(path.relative_to(folder))
        try:
            if not _inside(path, folder):
                raise SettingsError([f"{path} links outside the LoRA folder {folder}"])
            read, digest = read_cached(lora, transformer_config)
            size = lora.weights.stat().st_size
        except (PixArtSigmaError, OSError) as exc:  # a bad file is listed with its reason, never a crash
            # Whole: a front end may take the folder's path out of it, which a cut message would defeat.
            listed.append(LoraListing(lora.name, shown_path, problem=str(exc)[:MAX_PROBLEM_CHARS]))
            continue
        listed.append(LoraListing(lora.name, shown_path, read.layout,
                                  tuple(sorted({w.rank for w in read.transformer.values()})),
                                  len(read.transformer), size, digest))
    return listed


__all__ += ["LoraListing", "list_loras"]
