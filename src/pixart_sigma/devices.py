"""Device and number-format policy: which torch device a label means, and which dtype 'auto' picks."""

from __future__ import annotations

import re

import torch

from .errors import SettingsError

# ASCII digits only ("²" is a digit to str.isdigit but not to int()), at most 3 of them.
_CUDA_INDEX = re.compile(r"^cuda:([0-9]{1,3})$", re.ASCII)
_DASHAI_GPU_LABEL = re.compile(r"^gpu\s*([0-9]{1,3})\s*(:.*)?$", re.IGNORECASE | re.ASCII)


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(label: str) -> torch.device:
    """'auto', 'CPU', 'GPU', 'cuda', 'cuda:N', 'mps' (any case) or DashAI's 'GPU N: name ...' labels."""
    text = label.strip()
    lowered = text.lower()
    if lowered == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if torch.backends.mps.is_available():  # Apple silicon
            return torch.device("mps")
        return torch.device("cpu")
    if lowered == "cpu":
        return torch.device("cpu")
    index = None
    if lowered in ("gpu", "cuda"):
        index = 0
    elif _CUDA_INDEX.match(lowered):
        index = int(_CUDA_INDEX.match(lowered).group(1))
    elif _DASHAI_GPU_LABEL.match(text):
        index = int(_DASHAI_GPU_LABEL.match(text).group(1))
    elif lowered == "mps":
        if not torch.backends.mps.is_available():
            raise SettingsError([f"device={label!r} is not available here: available devices are {', '.join(available_devices())}"])
        return torch.device("mps")
    else:
        raise SettingsError([
            f"device={label[:80]!r} is not valid: use auto, CPU, GPU, cuda, cuda:N, mps or a DashAI label like 'GPU 0: ...'"
        ])
    if index >= torch.cuda.device_count():
        raise SettingsError([
            f"device={label!r} is not available here: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
            f"available devices are {', '.join(available_devices())}"
        ])
    return torch.device(f"cuda:{index}")


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls at 2-3x the float32 rate (elsewhere they are emulated, slower)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, check, lambda: False)() for check in checks)


def resolve_dtype(name: str, device: torch.device, field: str = "dtype") -> torch.dtype:
    """auto: bfloat16 on GPUs and CPUs with native bfloat16, float16 on older GPUs, float32 on other CPUs and mps."""
    if name == "auto":
        if device.type == "cuda":
            # Native bf16 only (Ampere and newer): T4 and V100 emulate it slowly, float16 is their format.
            with torch.cuda.device(device):
                return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == "cpu" and cpu_has_native_bfloat16():
            return torch.bfloat16
        return torch.float32
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype == torch.float16:
        raise SettingsError([
            f"{field}='float16' is not supported on the CPU (slow and missing kernels): use float32 (the closest "
            "to float16's precision) or bfloat16"
        ])
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text_encoder_dtype(setting: str, dtype_setting: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The T5 encoder's dtype: the `text_encoder_dtype` setting; for `auto`, `dtype`, except that dtype=auto on a
    CPU never holds T5-XXL in float32.

    T5-XXL is 19 GB in float32 and 9.5 GB in bfloat16; it runs once per new prompt (the embeddings
    are cached), so on a CPU without native bfloat16 its slower emulated matmuls cost little.
    """
    if setting != "auto":
        return resolve_dtype(setting, device, field="text_encoder_dtype")
    if dtype_setting == "auto" and device.type == "cpu":
        return torch.bfloat16
    return dtype
