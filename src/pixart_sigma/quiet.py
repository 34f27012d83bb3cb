"""Front ends show their own progress: silence the per-file loading bars and chatter of diffusers and
transformers (warnings that matter still come through our own errors and logs)."""

from __future__ import annotations


def quiet_libraries() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
