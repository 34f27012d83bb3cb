"""`pixart-sigma serve` with injected faults, for the service's fault tests only.

Prompts containing [oom] raise torch.OutOfMemoryError at step 1 (as a too-large job does on a GPU);
prompts containing [slow] take 0.2 s a step, so a test can act while a job runs. Everything else is
the real CLI and the real service.
"""

import sys
import time

import torch

import pixart_sigma.model as model_module
from pixart_sigma.cli import main

_real_generate = model_module.PixArtSigmaModel.generate


def _generate(self, prompt, *, on_progress=None, cancel=None, **overrides):
    def progress(step, total):
        if "[oom]" in prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        if "[slow]" in prompt:
            time.sleep(0.2)
        if on_progress is not None:
            on_progress(step, total)

    return _real_generate(self, prompt, on_progress=progress, cancel=cancel, **overrides)


model_module.PixArtSigmaModel.generate = _generate

if __name__ == "__main__":
    sys.exit(main())
