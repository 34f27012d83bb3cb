"""Device and number-format policy: which torch device a label means, and which dtype 'auto' picks."""

from __future__ import annotations

import re

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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


# text_encoder_dtype=int8: T5's Linear weights held in int8 (torchao's weight-only int8, one scale per output
# row), its activations in int8_activation_dtype. torch.int8 stands for it wherever a dtype names T5's format
# (engine keys, part sizes, records).
INT8 = torch.int8
_INT8_MARK = "_pixart_sigma_int8"  # set on a module quantize_int8 made


def int8_activation_dtype(device: torch.device) -> torch.dtype:
    """The dtype an int8 T5 computes in, fixed per kind of device so that a record's "int8" decides the pixels:
    bfloat16 on every CPU (emulated where not native, as dtype=auto's T5 on a CPU), bfloat16 on GPUs that have
    it and float32 on older ones (T5 overflows in float16)."""
    if device.type == "cuda" and resolve_dtype("auto", device) != torch.bfloat16:
        return torch.float32
    return torch.bfloat16


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Its Linear weights to int8 in place (about 1 byte per weight instead of 2); returns it."""
    from .quiet import import_torchao_quietly

    import_torchao_quietly()
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise SettingsError([f"text_encoder_dtype='int8' needs torchao 0.18 or later ({exc}): pip install "
                             "'pixart-sigma[int8]' (or 'torchao>=0.18'), or use text_encoder_dtype='bfloat16'"]) from None

    # set_inductor_config=False: leave torch.compile's process-wide settings (the transformer's compile) alone.
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False))
    setattr(module, _INT8_MARK, True)
    return module


def held_dtype(module: torch.nn.Module) -> torch.dtype:
    """The format a part's weights are held in, as settings and records name it: INT8 for a quantize_int8 one."""
    return INT8 if getattr(module, _INT8_MARK, False) else module.dtype


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized one (a tensor subclass) holds its inner tensors, not numel × its dtype."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are held (int8 weights at 1 byte each)."""
    return sum(tensor_bytes(tensor) for tensor in list(module.parameters()) + list(module.buffers()))


def text_encoder_dtype(setting: str, dtype_setting: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The T5 encoder's dtype: the `text_encoder_dtype` setting (INT8 for int8); for `auto`, `dtype`, except that
    dtype=auto on a CPU never holds T5-XXL in float32.

    T5-XXL is 19 GB in float32 and 9.5 GB in bfloat16; it runs once per new prompt (the embeddings
    are cached), so on a CPU without native bfloat16 its slower emulated matmuls cost little.
    """
    if setting == "int8":
        if device.type not in ("cpu", "cuda"):
            raise SettingsError([
                f"text_encoder_dtype='int8' is not supported on {device.type}: its int8 weights run through "
                "torchao, which supports CPUs and CUDA GPUs only; use text_encoder_dtype='bfloat16' or 'float32' "
                "there, or device='cpu'"
            ])
        return INT8
    if setting != "auto":
        return resolve_dtype(setting, device, field="text_encoder_dtype")
    if dtype_setting == "auto" and device.type == "cpu":
        return torch.bfloat16
    return dtype
