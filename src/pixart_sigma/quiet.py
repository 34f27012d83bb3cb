"""Front ends show their own progress: silence the per-file loading bars and chatter of diffusers and
transformers (warnings that matter still come through our own errors and logs)."""

from __future__ import annotations

import contextlib
from typing import Iterator


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
