"""LoRA files in the layouts found in the wild, read into one canonical form (and written back out).

The canonical form is keyed on the module names of diffusers' `PixArtTransformer2DModel`
(`transformer_blocks.3.attn1.to_q`): for each target module, its `down` (rank x in), `up`
(out x rank) and `alpha`, so that the module's weight becomes `W + scale * (alpha / rank) * up @ down`,
which is what peft's `LoraConfig(r, lora_alpha)` means. A text-encoder (T5) part is kept apart,
keyed on `T5EncoderModel` module names.

Layouts read (and written by `write_lora`):
- "peft": a PEFT adapter folder, `adapter_config.json` (r, lora_alpha, rank_pattern, alpha_pattern,
  target_modules, use_rslora) + `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`).
- "diffusers": one flat file, `transformer.<module>.lora_A/lora_B.weight` (or `lora.down/lora.up`,
  `lora_linear_layer.down/up`), alpha from `.alpha` keys or diffusers' `lora_adapter_metadata` header.
- "pixart-script": the official PixArt-sigma LoRA script's flat file, saved through
  `StableDiffusionPipeline.save_lora_weights`, so `unet.base_model.model.<module>.lora_A.weight`; no alpha.
- "kohya": OneTrainer / kohya names, `lora_transformer_<module_with_underscores>.lora_down/lora_up.weight`
  and `.alpha`, text encoder `lora_te_<t5_module>`; underscores are mapped back by looking the name up
  among the real module names, never by splitting on underscores.
- "original": names of the original PixArt code (`blocks.N.attn.qkv`, `cross_attn.kv_linear`, `mlp.fc1`,
  `t_block.1` ...), dotted or kohya-underscored; fused qkv / kv are split onto diffusers' q/k/v (up rows
  in order, the same down), and OneTrainer's per-piece names `attn.qkv.0/1/2` are read too.

Refused, by name: pickle files (.ckpt/.pt/.bin...), LyCORIS LoHa/LoKr/OFT/LoCon-Tucker, DoRA, keys
that match no module or whose shapes do not fit it (all listed in one error: a LoRA never silently
does nothing). A missing alpha means alpha = rank (scale 1, diffusers' and peft's convention; kohya's
alpha 0 means the same) and warns once, naming the file.

Pure: reads and writes files, never builds or loads a model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .checkpoints import PICKLE_SUFFIXES, read_config, regular_file
from .errors import CheckpointError, SettingsError

log = logging.getLogger(__name__)

# -- bounds and names (each fact once) ---------------------------------------------------------
# A rank-1152 LoRA on every linear of the 1024 model in float32 is about 3.9 GB: more is no LoRA.
MAX_LORA_BYTES = 4 << 30
MAX_LORA_HEADER_BYTES = 16 << 20  # a full LoRA's header (keys, shapes, metadata) is well under 1 MB
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the float types we read
ALPHA_DTYPES = FLOAT_DTYPES + ("I64", "I32", "I16", "I8", "U8")  # some writers store alpha as an integer
SHOWN_KEYS = 20  # an error lists this many keys, then counts the rest

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

LAYOUTS = ("peft", "diffusers", "pixart-script", "kohya", "original")
TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"

# Key endings: which tensor of a LoRA pair a key holds.
ROLE_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# Key parts of adapters that are not a down/up pair; such a file is refused by the format's name.
NOT_LORA_MARKERS = {
    "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "oft_": "LyCORIS/PEFT OFT", "lora_mid": "LyCORIS LoCon (Tucker)",
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA (PEFT)", "lora_embedding_": "PEFT embedding LoRA",
}
_NOT_LORA = re.compile(r"(?:^|[._])(" + "|".join(re.escape(m) for m in NOT_LORA_MARKERS) + r")")

# Key prefixes before a module name, per part, longest first; `layout` is None where the module name decides.
DOTTED_PREFIXES = (
    ("unet.base_model.model.", TRANSFORMER, "pixart-script"), ("unet.", TRANSFORMER, "pixart-script"),
    ("transformer.base_model.model.", TRANSFORMER, "diffusers"), ("transformer.", TRANSFORMER, None),
    ("lora_transformer.", TRANSFORMER, "kohya"), ("base_model.model.", TRANSFORMER, "peft"),
    ("model.diffusion_model.", TRANSFORMER, "original"), ("diffusion_model.", TRANSFORMER, "original"),
    ("text_encoder.base_model.model.", TEXT_ENCODER, None), ("text_encoder.", TEXT_ENCODER, None),
    ("lora_te.", TEXT_ENCODER, "kohya"), ("t5.", TEXT_ENCODER, "original"), ("", TRANSFORMER, None),
)
UNDERSCORE_PREFIXES = (("lora_transformer_", TRANSFORMER), ("lora_unet_", TRANSFORMER), ("lora_te_", TEXT_ENCODER))

# Original PixArt module -> the diffusers module(s) it became; a fused projection lists its pieces in row order.
ORIGINAL_MODULES = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("adaln_single.emb.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("adaln_single.emb.timestep_embedder.linear_2",),
    "t_block.1": ("adaln_single.linear",),
    "y_embedder.y_proj.fc1": ("caption_projection.linear_1",),
    "y_embedder.y_proj.fc2": ("caption_projection.linear_2",),
    "csize_embedder.mlp.0": ("adaln_single.emb.resolution_embedder.linear_1",),
    "csize_embedder.mlp.2": ("adaln_single.emb.resolution_embedder.linear_2",),
    "ar_embedder.mlp.0": ("adaln_single.emb.aspect_ratio_embedder.linear_1",),
    "ar_embedder.mlp.2": ("adaln_single.emb.aspect_ratio_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
}
ORIGINAL_BLOCK_MODULES = {  # inside blocks.N -> inside transformer_blocks.N
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
# T5 encoder modules a LoRA can target, inside encoder.block.N (wi for relu T5, wi_0/wi_1 for gated-gelu).
T5_BLOCK_MODULES = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                    "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0",
                    "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo")
_T5_NAME = re.compile(r"encoder[._]block[._](\d+)[._](.+)")
TIMESTEP_CHANNELS = 256  # diffusers' PixArt timestep and size embedders take 256 sinusoidal channels


# -- the canonical form ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA: weight += scale * (alpha / rank) * up @ down."""

    down: Any  # torch.Tensor (rank, in), or (rank, in, k, k) on the patch-embedding convolution
    up: Any  # torch.Tensor (out, rank), or (out, rank, 1, 1) on the convolution
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self):
        """The float32 change this LoRA makes to the module's weight at scale 1 (the weight's own shape)."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (up @ down).reshape(shape) * (self.alpha / self.rank)


@dataclass(frozen=True)
class Lora:
    """A LoRA in canonical form: transformer modules (diffusers names) and a T5 part, kept apart."""

    transformer: dict[str, LoraWeights]
    text_encoder: dict[str, LoraWeights] = field(default_factory=dict)
    layout: str = "canonical"
    source: Optional[Path] = None
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__
    alpha_defaulted: bool = False  # some module had no alpha, so alpha = rank was used


@dataclass(frozen=True)
class Target:
    """A module a LoRA can change: a Linear, or the patch-embedding Conv2d (kernel = stride = patch size)."""

    in_features: int
    out_features: int
    kernel: int = 0  # 0 for a Linear


# -- which modules exist ------------------------------------------------------------------------
def _int(config: Mapping, key: str, default: Any = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise SettingsError([f"{key}={value!r} in the transformer config: a positive integer is needed "
                             "to know the modules a LoRA may target"])
    return value


def transformer_targets(config: Mapping) -> dict[str, Target]:
    """Every module of a PixArtTransformer2DModel with this config that a LoRA can target, with its sizes
    (as diffusers 0.42 builds them: ada_norm_single, feed-forward 4x, size embedders of inner/3)."""
    inner = _int(config, "num_attention_heads") * _int(config, "attention_head_dim")
    patch, in_channels = _int(config, "patch_size"), _int(config, "in_channels")
    out_channels = _int(config, "out_channels", in_channels)
    cross = _int(config, "cross_attention_dim", inner)
    additional = config.get("use_additional_conditions")
    if additional is None:  # diffusers' rule: the 1024 models (sample_size 128) take size conditions
        additional = config.get("sample_size", 128) == 128
    targets = {
        "pos_embed.proj": Target(in_channels, inner, kernel=patch),
        "adaln_single.emb.timestep_embedder.linear_1": Target(TIMESTEP_CHANNELS, inner),
        "adaln_single.emb.timestep_embedder.linear_2": Target(inner, inner),
        "adaln_single.linear": Target(inner, 6 * inner),
        "proj_out": Target(inner, patch * patch * out_channels),
    }
    if additional:
        for embedder in ("resolution_embedder", "aspect_ratio_embedder"):
            targets[f"adaln_single.emb.{embedder}.linear_1"] = Target(TIMESTEP_CHANNELS, inner // 3)
            targets[f"adaln_single.emb.{embedder}.linear_2"] = Target(inner // 3, inner // 3)
    if config.get("caption_channels") is not None:
        targets["caption_projection.linear_1"] = Target(_int(config, "caption_channels"), inner)
        targets["caption_projection.linear_2"] = Target(inner, inner)
    block = {"attn1.to_q": Target(inner, inner), "attn1.to_k": Target(inner, inner),
             "attn1.to_v": Target(inner, inner), "attn1.to_out.0": Target(inner, inner),
             "attn2.to_q": Target(inner, inner), "attn2.to_k": Target(cross, inner),
             "attn2.to_v": Target(cross, inner), "attn2.to_out.0": Target(inner, inner),
             "ff.net.0.proj": Target(inner, 4 * inner), "ff.net.2": Target(4 * inner, inner)}
    for index in range(_int(config, "num_layers")):
        targets.update({f"transformer_blocks.{index}.{name}": t for name, t in block.items()})
    return targets


def text_encoder_targets(config: Mapping) -> dict[str, Target]:
    """The T5 encoder modules a LoRA can target, with sizes from a T5 config."""
    d_model, d_ff, layers = _int(config, "d_model"), _int(config, "d_ff"), _int(config, "num_layers")
    attention = _int(config, "num_heads") * _int(config, "d_kv")
    gated = str(config.get("feed_forward_proj", "relu")).startswith("gated")
    sizes = {"q": (d_model, attention), "k": (d_model, attention), "v": (d_model, attention),
             "o": (attention, d_model), "wi": (d_model, d_ff), "wi_0": (d_model, d_ff),
             "wi_1": (d_model, d_ff), "wo": (d_ff, d_model)}
    targets = {}
    for index in range(layers):
        for name in T5_BLOCK_MODULES:
            last = name.rsplit(".", 1)[1]
            if last in (("wi",) if gated else ("wi_0", "wi_1")):  # gated T5: wi_0 and wi_1; plain: wi
                continue
            targets[f"encoder.block.{index}.{name}"] = Target(*sizes[last])
    return targets


def original_modules(targets: Mapping[str, Target]) -> dict[str, tuple[str, ...]]:
    """Original PixArt module names (and OneTrainer's `attn.qkv.0`-style pieces) -> diffusers modules."""
    names: dict[str, tuple[str, ...]] = {o: d for o, d in ORIGINAL_MODULES.items() if d[0] in targets}
    index = 0
    while f"transformer_blocks.{index}.attn1.to_q" in targets:
        for original, pieces in ORIGINAL_BLOCK_MODULES.items():
            diffusers = tuple(f"transformer_blocks.{index}.{p}" for p in pieces)
            names[f"blocks.{index}.{original}"] = diffusers
            if len(pieces) > 1:
                names.update({f"blocks.{index}.{original}.{i}": (d,) for i, d in enumerate(diffusers)})
        index += 1
    return names


# -- reading a safetensors file we do not trust ------------------------------------------------
def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def safetensors_header(path: Path, limit: Optional[int] = None) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries ({name: {dtype, shape, data_offsets}}) and `__metadata__` of a safetensors file of at
    most `limit` bytes (MAX_LORA_BYTES), read from its bounded header alone (no tensor read)."""
    size = regular_file(path, limit or MAX_LORA_BYTES).stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_LORA_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file: its header length ({length:,} bytes) must be "
                                  f"from 1 to {MAX_LORA_HEADER_BYTES:,} and fit in the file ({size:,} bytes)")
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: the header's __metadata__ must map names to strings")
    bad = [name for name, entry in header.items() if not (
        isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
        and all(isinstance(n, int) and n >= 0 for n in entry["shape"]))]
    if bad:
        raise CheckpointError(f"{path}: header entries without a dtype and shape: {_listed(sorted(bad))}")
    return header, metadata


def _load_tensors(path: Path, names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: weights.get_tensor(name) for name in names}
    except Exception as exc:  # offsets outside the file, truncated data
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _refuse_not_lora(path: Path, names: list[str]) -> None:
    for name in names:
        match = _NOT_LORA.search(name)
        if match:
            raise CheckpointError(
                f"{path} is a {NOT_LORA_MARKERS[match.group(1)]} adapter (key {name}), not a LoRA: pixart-sigma reads "
                "LoRA down/up pairs only (peft, diffusers, kohya/OneTrainer or original PixArt names). "
                "Convert or re-train it as a plain LoRA.")


# -- key names -> modules ----------------------------------------------------------------------
@dataclass
class _Names:
    """The module names of one transformer (and optionally T5) config, in every spelling a LoRA uses."""

    transformer: dict[str, Target]
    original: dict[str, tuple[str, ...]]
    underscored: dict[str, str]  # module name with dots as underscores -> module name (diffusers or original)
    text_encoder: Optional[dict[str, Target]]

    @classmethod
    def of(cls, transformer_config: Mapping, text_encoder_config: Optional[Mapping]) -> "_Names":
        targets = transformer_targets(transformer_config)
        original = original_modules(targets)
        underscored = {name.replace(".", "_"): name for name in [*targets, *original]}
        t5 = text_encoder_targets(text_encoder_config) if text_encoder_config is not None else None
        return cls(targets, original, underscored, t5)

    def transformer_modules(self, name: str) -> Optional[tuple[tuple[str, ...], str]]:
        """(diffusers modules, "diffusers" or "original") for a dotted name, else None."""
        if name in self.transformer:
            return (name,), "diffusers"
        if name in self.original:
            return self.original[name], "original"
        return None

    def text_encoder_module(self, name: str) -> Optional[str]:
        """The T5 module a dotted or underscored name means, else None (checked against the T5 config when given)."""
        match = _T5_NAME.fullmatch(name)
        if not match:
            return None
        rest = {m: m for m in T5_BLOCK_MODULES} | {m.replace(".", "_"): m for m in T5_BLOCK_MODULES}
        module = rest.get(match.group(2))
        full = module and f"encoder.block.{int(match.group(1))}.{module}"
        if full and (self.text_encoder is None or full in self.text_encoder):
            return full
        return None


@dataclass(frozen=True)
class _Stem:
    """What one key stem (a key less its role suffix) means."""

    part: str  # TRANSFORMER or TEXT_ENCODER
    modules: tuple[str, ...]  # the target(s); several for a fused projection
    layout: str


def _resolve(stem: str, names: _Names) -> Optional[_Stem]:
    for prefix, part in UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            if part == TEXT_ENCODER:
                module = names.text_encoder_module(rest)
                return _Stem(part, (module,), "kohya") if module else None
            name = names.underscored.get(rest)
            found = name and names.transformer_modules(name)
            return _Stem(part, found[0], "original" if found[1] == "original" else "kohya") if found else None
    for prefix, part, layout in DOTTED_PREFIXES:
        if not stem.startswith(prefix):
            continue
        rest = stem[len(prefix):]
        if part == TEXT_ENCODER:
            module = names.text_encoder_module(rest)
            if module:
                return _Stem(part, (module,), layout or "diffusers")
            continue
        found = names.transformer_modules(rest)
        if found:
            return _Stem(part, found[0], "original" if found[1] == "original" else (layout or "diffusers"))
    return None


def _split_role(key: str) -> Optional[tuple[str, str]]:
    for suffix, role in ROLE_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


# -- alpha ---------------------------------------------------------------------------------------
def _pattern_value(patterns: Any, module: str) -> Any:
    """peft's rule for rank_pattern / alpha_pattern: the first key K with `(.*\\.)?(K)$` matching the module."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return None


def _config_alpha(config: Mapping, module: str) -> Any:
    """A module's alpha as a LoraConfig-like dict states it (None when it states none)."""
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    return config.get("lora_alpha") if alpha is None else alpha


def _alpha_from_config(path: Path, stem: str, config: Mapping, module: str, rank: int) -> Optional[float]:
    """The canonical alpha a LoraConfig-like dict gives a module (None when it gives none)."""
    stated = _config_alpha(config, module)
    if stated is None:
        return None
    alpha = _alpha_number(path, f"the config's alpha for {stem}", stated)
    if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(rank), i.e. by (alpha * sqrt(rank)) / rank
        alpha *= math.sqrt(rank)
    return alpha


def _config_rank(config: Mapping, module: str) -> Optional[int]:
    rank = _pattern_value(config.get("rank_pattern"), module)
    return rank if rank is not None else config.get("r")


def _diffusers_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: LoraConfig fields per part ({"transformer": {...}})."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: the header's {DIFFUSERS_METADATA_KEY} is not JSON") from None
    if not isinstance(packed, dict):
        raise CheckpointError(f"{path}: the header's {DIFFUSERS_METADATA_KEY} must be a JSON object")
    parts: dict[str, dict] = {}
    for key, value in packed.items():
        part, _, name = str(key).partition(".")
        parts.setdefault({"unet": TRANSFORMER}.get(part, part), {})[name] = value
    return parts


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class _Pair:
    stem: _Stem
    keys: dict[str, str] = field(default_factory=dict)  # role -> key


def _alpha_number(path: Path, where: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise CheckpointError(f"{path}: {where} = {value!r}: an alpha must be a finite number >= 0 (0 means alpha = rank)")
    return number


def _shape_problems(pair: _Pair, header: dict, names: _Names) -> list[str]:
    """Why a pair's shapes do not fit its module(s), or []."""
    down_key, up_key = pair.keys["down"], pair.keys["up"]
    down, up = header[down_key]["shape"], header[up_key]["shape"]
    modules = pair.stem.modules
    table = names.transformer if pair.stem.part == TRANSFORMER else names.text_encoder
    problems = []
    for key in (down_key, up_key):
        if header[key]["dtype"] not in FLOAT_DTYPES:
            problems.append(f"{key} is {header[key]['dtype']} (a float type is needed: {', '.join(FLOAT_DTYPES)})")
    if table is None:  # a T5 part read without a T5 config: only the pair's own agreement is checked
        if not (len(down) == len(up) == 2 and down[0] == up[1] and down[0] > 0):
            problems.append(f"{down_key} {down} and {up_key} {up} are not a (rank, in) and (out, rank) pair")
        return problems
    targets = [table[m] for m in modules]
    kernel = targets[0].kernel
    want_down = [None, targets[0].in_features] + ([kernel, kernel] if kernel else [])
    want_up = [sum(t.out_features for t in targets), None] + ([1, 1] if kernel else [])
    fits = (len(down) == len(want_down) and len(up) == len(want_up) and down[0] == up[1] and down[0] > 0
            and all(w is None or w == s for w, s in zip(want_down, down))
            and all(w is None or w == s for w, s in zip(want_up, up)))
    if not fits:
        kind = f"a Conv2d of kernel {kernel}" if kernel else "a Linear"
        down_rule = ", ".join(["rank", *(str(w) for w in want_down[1:])])
        up_rule = ", ".join([str(want_up[0]), "rank", *(["1", "1"] if kernel else [])])
        problems.append(f"{down_key} {down} and {up_key} {up} do not fit {' + '.join(modules)} ({kind}): "
                        f"down must be [{down_rule}] and up [{up_rule}], the same rank in both")
    return problems


def _pairs(path: Path, header: dict, names: _Names) -> dict[str, _Pair]:
    """Every key grouped by stem, or one CheckpointError listing every key that fits nothing."""
    if not header:
        raise CheckpointError(f"{path} holds no tensors: it is no LoRA")
    pairs: dict[str, _Pair] = {}
    unknown, repeated = [], []
    for key in header:
        split = _split_role(key)
        stem = split and _resolve(split[0], names)
        if not stem:
            unknown.append(key)
            continue
        pair = pairs.setdefault(split[0], _Pair(stem))
        if split[1] in pair.keys:  # e.g. both lora_A and lora_down: one would be ignored
            repeated.append(f"{pair.keys[split[1]]} and {key}")
        pair.keys[split[1]] = key
    problems = []
    if repeated:
        problems.append(f"tensors given twice for one module: {_listed(sorted(repeated))}")
    if unknown:
        problems.append(f"keys that match no module of this model ({len(unknown)}): {_listed(sorted(unknown))}")
    incomplete = [f"{stem} (has {', '.join(sorted(p.keys))})" for stem, p in pairs.items()
                  if not {"down", "up"} <= set(p.keys)]
    if incomplete:
        problems.append(f"modules without both a down and an up tensor: {_listed(sorted(incomplete))}")
    for pair in pairs.values():
        if {"down", "up"} <= set(pair.keys):
            problems += _shape_problems(pair, header, names)
        alpha_key = pair.keys.get("alpha")
        if alpha_key and (header[alpha_key]["dtype"] not in ALPHA_DTYPES
                          or math.prod(header[alpha_key]["shape"]) != 1):
            problems.append(f"{alpha_key} is {header[alpha_key]['dtype']} {header[alpha_key]['shape']} "
                            "(an alpha is one number)")
    twice = _targeted_twice(pairs)
    if twice:
        problems.append(f"modules given more than once (e.g. fused and split): {_listed(twice)}")
    if problems:
        raise CheckpointError(
            f"{path} does not fit this model's modules, so it would not apply as written:\n  - "
            + "\n  - ".join(problems)
            + "\nValid targets are the Linear modules of PixArtTransformer2DModel (e.g. transformer_blocks.0.attn1.to_q, "
              "ff.net.0.proj, adaln_single.linear, proj_out), the patch embedding pos_embed.proj, their original "
              "PixArt names (blocks.N.attn.qkv, cross_attn.kv_linear, mlp.fc1, t_block.1, ...), and T5 encoder modules.")
    return pairs


def _targeted_twice(pairs: dict[str, _Pair]) -> list[str]:
    seen = Counter((p.stem.part, m) for p in pairs.values() for m in p.stem.modules)
    return sorted(m for (_, m), n in seen.items() if n > 1)


def _split_pieces(pair: _Pair, down, up, names: _Names) -> dict[str, tuple[Any, Any]]:
    """A fused projection's up rows cut in the pieces' order, each with the same down."""
    table = names.transformer if pair.stem.part == TRANSFORMER else names.text_encoder
    if len(pair.stem.modules) == 1:
        return {pair.stem.modules[0]: (down, up)}
    sizes = [table[m].out_features for m in pair.stem.modules]
    return {m: (down, piece.contiguous()) for m, piece in zip(pair.stem.modules, up.split(sizes, dim=0))}


def _read_file(path: Path, names: _Names, config: Optional[Mapping], layout: Optional[str]) -> Lora:
    """Read one safetensors LoRA. `config` is a PEFT adapter_config (a folder's), else the header's own."""
    header, metadata = safetensors_header(path)
    _refuse_not_lora(path, list(header))
    pairs = _pairs(path, header, names)
    tensors = _load_tensors(path, list(header))
    not_finite = sorted(key for key, tensor in tensors.items() if not tensor.float().isfinite().all())
    if not_finite:
        raise CheckpointError(f"{path} has NaN or infinite values (they would ruin every picture) in: {_listed(not_finite)}")
    configs = {TRANSFORMER: config} if config is not None else _diffusers_metadata(path, metadata)
    parts: dict[str, dict[str, LoraWeights]] = {TRANSFORMER: {}, TEXT_ENCODER: {}}
    defaulted, rank_problems = [], []
    for stem, pair in pairs.items():
        down, up = tensors[pair.keys["down"]], tensors[pair.keys["up"]]
        rank = int(down.shape[0])
        part_config = configs.get(pair.stem.part) or {}
        if "alpha" in pair.keys:  # a stored alpha wins over any config
            alpha = _alpha_number(path, pair.keys["alpha"], tensors[pair.keys["alpha"]].float().item())
        else:
            alpha = _alpha_from_config(path, stem, part_config, pair.stem.modules[0], rank)
        stated = _config_rank(part_config, pair.stem.modules[0])
        if stated is not None and stated != rank:
            rank_problems.append(f"{stem}: the config says rank {stated}, the tensors have rank {rank}")
        if not alpha:  # missing, or kohya's 0: alpha = rank
            alpha = float(rank)
            defaulted.append(stem)
        for module, (piece_down, piece_up) in _split_pieces(pair, down, up, names).items():
            parts[pair.stem.part][module] = LoraWeights(piece_down, piece_up, float(alpha))
    if rank_problems:
        raise CheckpointError(f"{path}: ranks disagree with the adapter config: {_listed(rank_problems)}")
    if defaulted:
        log.warning("%s has no alpha for %d module(s) (e.g. %s): using alpha = rank (scale 1), the diffusers/peft "
                    "convention; store an alpha in the file if it was trained with another", path, len(defaulted),
                    defaulted[0])
    # the transformer part names the layout (a T5 part under text_encoder. is written the same by several)
    layouts = sorted({p.stem.layout for p in pairs.values() if p.stem.part == TRANSFORMER}
                     or {p.stem.layout for p in pairs.values()})
    return Lora(parts[TRANSFORMER], parts[TEXT_ENCODER], layout or "+".join(layouts) or "empty", path,
                dict(metadata), bool(defaulted))


def _peft_targets_problems(config: Mapping, modules: list[str]) -> list[str]:
    """Modules with weights that the adapter config does not target (peft would silently skip them)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []

    def targeted(module: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return module in targets or any(module.endswith(f".{t}") for t in targets)

    return [m for m in modules if not targeted(m)]


def _read_peft_folder(folder: Path, names: _Names) -> Lora:
    config_path = folder / PEFT_CONFIG
    config = read_config(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{folder} is a PEFT {peft_type} adapter ({config_path}), not a LoRA: pixart-sigma "
                              "reads LoRA adapters only (peft_type LORA)")
    if config.get("use_dora"):
        raise CheckpointError(f"{config_path} has use_dora: true: DoRA adapters are not read, only plain LoRA")
    weights = folder / PEFT_WEIGHTS
    if not weights.exists():
        pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        hint = f" (it holds {', '.join(sorted(pickles))}: pickle files are never read)" if pickles else ""
        raise CheckpointError(f"{folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}{hint}")
    lora = _read_file(weights, names, config, "peft")
    untargeted = _peft_targets_problems(config, sorted(lora.transformer))
    if untargeted:
        raise CheckpointError(f"{weights} has weights for modules its {PEFT_CONFIG} target_modules "
                              f"({config.get('target_modules')!r}) do not name: {_listed(untargeted)}")
    return lora


def _weights_in_folder(folder: Path) -> Path:
    """The one LoRA file of a folder that is not a PEFT adapter folder."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))
    if len(files) == 1:
        return files[0]
    if files:
        raise CheckpointError(f"{folder} holds several safetensors files ({_listed([p.name for p in files])}): "
                              "name the LoRA file itself")
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{folder} holds only pickle files ({_listed(pickles)}): LoRAs are read from safetensors "
                              "only, because unpickling can run arbitrary code; convert them with a tool you trust")
    raise CheckpointError(f"{folder} holds no LoRA: a *.safetensors file or a PEFT folder ({PEFT_CONFIG} + "
                          f"{PEFT_WEIGHTS}) is needed")


def read_lora(path: Union[str, Path], transformer_config: Mapping,
              text_encoder_config: Optional[Mapping] = None) -> Lora:
    """Read a LoRA file or PEFT folder into the canonical form for a transformer with this config.

    Every key must name a module of that transformer (or of T5) and fit its shape; T5 shapes are checked
    when `text_encoder_config` is given. Raises CheckpointError naming the file, keys and rule.
    """
    path = Path(path)
    names = _Names.of(transformer_config, text_encoder_config)
    if path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path} is a pickle file ({path.suffix}): LoRAs are read from .safetensors only, "
                              "because unpickling can run arbitrary code; convert it with a tool you trust")
    if path.is_dir():
        if (path / PEFT_CONFIG).exists():
            return _read_peft_folder(path, names)
        path = _weights_in_folder(path)
    elif not path.name.endswith(".safetensors"):
        raise CheckpointError(f"{path} is not a .safetensors file or a PEFT folder: those are the LoRAs read")
    return _read_file(path, names, None, None)


# -- writing ------------------------------------------------------------------------------------------
def peft_config(weights: Mapping[str, LoraWeights]) -> dict[str, Any]:
    """LoraConfig fields that give these modules their ranks and alphas in peft: the commonest as r and
    lora_alpha, the others in rank_pattern / alpha_pattern, every module named in target_modules."""
    ranks = {m: w.rank for m, w in weights.items()}
    alphas = {m: w.alpha for m, w in weights.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
            "target_modules": sorted(weights)}


def _own_copy(tensor):
    """A contiguous copy: safetensors refuses tensors sharing memory (a fused qkv's pieces share one down)."""
    import torch

    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _scalar(value: float):
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _save(path: Path, tensors: dict, metadata: Mapping[str, str]) -> None:
    """safetensors with its header's keys sorted: safetensors writes the metadata in a per-process order, so the
    same LoRA would get another SHA-256 (the hash records and `--from` find LoRAs by) each time it is written."""
    from safetensors.torch import save

    data = save({k: _own_copy(v) for k, v in tensors.items()}, metadata={"format": "pt", **metadata})
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = header.encode()
    if len(encoded) <= length:  # the same keys and values: the same length, padded as safetensors pads
        data = data[:8] + encoded + b" " * (length - len(encoded)) + data[8 + length:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pairs_named(weights: Mapping[str, LoraWeights], prefix: str, down: str, up: str,
                 alpha: Optional[str], underscores: bool = False) -> dict:
    tensors = {}
    for module, w in weights.items():
        stem = prefix + (module.replace(".", "_") if underscores else module)
        tensors[stem + down], tensors[stem + up] = w.down, w.up
        if alpha:
            tensors[stem + alpha] = _scalar(w.alpha)
    return tensors


def _fused_original(weights: Mapping[str, LoraWeights], original: Mapping[str, tuple[str, ...]]) -> dict[str, LoraWeights]:
    """Canonical modules under original PixArt names: q/k/v (k/v) fused when they share down and alpha,
    else OneTrainer's per-piece names (`attn.qkv.0`)."""
    import torch

    by_pieces = {pieces: name for name, pieces in original.items()}
    named: dict[str, LoraWeights] = {}
    done: set[str] = set()
    for pieces, name in by_pieces.items():
        if len(pieces) > 1 and all(p in weights for p in pieces):
            first = weights[pieces[0]]
            if all(torch.equal(weights[p].down, first.down) and weights[p].alpha == first.alpha for p in pieces):
                named[name] = LoraWeights(first.down, torch.cat([weights[p].up for p in pieces]), first.alpha)
                done.update(pieces)
    for module, w in weights.items():
        if module not in done:
            named[by_pieces[(module,)]] = w
    return named


def write_lora(path: Union[str, Path], lora: Lora, layout: str, transformer_config: Optional[Mapping] = None,
               metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a canonical LoRA in one of LAYOUTS (see the module's docstring); returns the path written.

    "peft" writes a folder; the others one file. "pixart-script" stores no alpha (as the script does), so
    alpha / rank is folded into `up`. "original" needs the transformer config to name the blocks.
    `metadata` goes into the safetensors header (strings).
    """
    path = Path(path)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    t, te = lora.transformer, lora.text_encoder
    if layout == "peft":
        if te:
            raise SettingsError([f"layout 'peft' holds one model's adapter: this LoRA also has {len(te)} text-encoder "
                                 "modules; write it as 'diffusers' or 'kohya'"])
        config = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0,
                  "use_rslora": False, "use_dora": False, **peft_config(t)}
        _save(path / PEFT_WEIGHTS, _pairs_named(t, "base_model.model.", ".lora_A.weight", ".lora_B.weight", None),
              metadata)
        (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    elif layout == "diffusers":
        tensors = _pairs_named(t, "transformer.", ".lora_A.weight", ".lora_B.weight", None)
        tensors |= _pairs_named(te, "text_encoder.", ".lora_A.weight", ".lora_B.weight", None)
        packed = {f"{part}.{k}": v for part, weights in ((TRANSFORMER, t), (TEXT_ENCODER, te)) if weights
                  for k, v in peft_config(weights).items()}
        _save(path, tensors, {**metadata, DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)})
    elif layout == "pixart-script":
        def folded(weights):
            return {m: LoraWeights(w.down, w.up * (w.alpha / w.rank), float(w.rank)) for m, w in weights.items()}
        tensors = _pairs_named(folded(t), "unet.base_model.model.", ".lora_A.weight", ".lora_B.weight", None)
        tensors |= _pairs_named(folded(te), "text_encoder.base_model.model.", ".lora_A.weight", ".lora_B.weight", None)
        _save(path, tensors, metadata)
    elif layout == "kohya":
        tensors = _pairs_named(t, "lora_transformer_", ".lora_down.weight", ".lora_up.weight", ".alpha", True)
        tensors |= _pairs_named(te, "lora_te_", ".lora_down.weight", ".lora_up.weight", ".alpha", True)
        _save(path, tensors, metadata)
    elif layout == "original":
        if transformer_config is None:
            raise SettingsError(["transformer_config is needed to write the 'original' layout (block names)"])
        original = original_modules(transformer_targets(transformer_config))
        tensors = _pairs_named(_fused_original(t, original), "", ".lora_down.weight", ".lora_up.weight", ".alpha")
        tensors |= _pairs_named(te, "t5.", ".lora_down.weight", ".lora_up.weight", ".alpha")
        _save(path, tensors, metadata)
    else:
        raise SettingsError([f"layout={layout!r} is not a LoRA layout: valid are {', '.join(LAYOUTS)}"])
    return path


__all__ = ["LAYOUTS", "Lora", "LoraWeights", "Target", "read_lora", "write_lora", "peft_config",
           "transformer_targets", "text_encoder_targets", "original_modules", "safetensors_header",
           "MAX_LORA_BYTES", "MAX_LORA_HEADER_BYTES"]
