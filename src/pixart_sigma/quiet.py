"""Front ends show their own progress: silence the per-file loading bars and chatter of diffusers and
transformers (warnings that matter still come through our own errors and logs)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

# Loggers that speak when torchao (text_encoder_dtype=int8) is first imported, about nothing that concerns us:
# torchao's CUDA-only kernels on a CPU build of torch, torch deprecating how torchao registers two enums, and
# diffusers missing torchao classes that moved (they load checkpoints saved quantized: we load none).
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_libraries() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """The libraries' loading bars off while our own code loads weights (a library user asked for no bar),
    back as they were after. Loads run one at a time (engine._read_lock), so the switch is not raced."""
    import diffusers
    import transformers

    libraries = [(library, library.utils.logging.is_progress_bar_enabled()) for library in (diffusers, transformers)]
    for library, _ in libraries:
        library.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for library, enabled in libraries:
            if enabled:
                library.utils.logging.enable_progress_bar()


def import_torchao_quietly() -> None:
    """Import torchao, and the part of diffusers that imports it at a model's first load, without their chatter."""
    loggers = [logging.getLogger(name) for name in TORCHAO_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import diffusers.quantizers.torchao.torchao_quantizer  # noqa: F401
        import torchao.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken for this torch: only int8 needs it (quantize_int8 says so)
        pass
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
