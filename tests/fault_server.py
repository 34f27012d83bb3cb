"""`pixart-sigma serve` with injected faults, for the service's fault tests only.

Prompts containing [oom] raise torch.OutOfMemoryError at step 1 (as a too-large job does on a GPU);
prompts containing [slow] take 0.2 s a step, so a test can act while a job runs; prompts containing
[slowsave] take 0.3 s after writing each image, so a test can kill the server between two images;
prompts containing [untilfull] wait at their first step until the disk is full (below), so the disk
fills during that job whatever the machine's speed (only until it has been full once).
While the file named by PIXART_FAULT_DISK_FULL exists, the disk is full: every write to the job store
fails as SQLite fails then ("database or disk is full") and writing an image fails with ENOSPC.
Everything else is the real CLI and the real service.
"""

import errno
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import pixart_sigma.model as model_module
import pixart_sigma.server.service as service_module
import pixart_sigma.server.store as store_module
from pixart_sigma.cli import main

_real_generate = model_module.PixArtSigmaModel.generate
_real_using = store_module.JobStore._using
_real_save = service_module.save_image
FULL = os.environ.get("PIXART_FAULT_DISK_FULL")


_filled = False  # the disk has been full once: [untilfull] jobs wait no more (a retry must not wait)


def _disk_full() -> bool:
    return bool(FULL) and Path(FULL).exists()


def _note_fullness() -> None:
    global _filled
    _filled = _filled or _disk_full()


def _generate(self, prompt, *, on_progress=None, cancel=None, **overrides):
    def progress(step, total):
        if "[oom]" in prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        if "[slow]" in prompt:
            time.sleep(0.2)
        deadline = time.monotonic() + 60
        while "[untilfull]" in prompt and step == 1 and not _filled and time.monotonic() < deadline:
            _note_fullness()
            time.sleep(0.02)
        if on_progress is not None:
            on_progress(step, total)

    images = _real_generate(self, prompt, on_progress=progress, cancel=cancel, **overrides)
    for image in images:
        image.info["fault_slow_save"] = "[slowsave]" in prompt
    return images


class _FullDisk:
    """The connection, but writes fail as SQLite's do on a full disk."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if not sql.lstrip().upper().startswith("SELECT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def executemany(self, sql, *args):
        raise sqlite3.OperationalError("database or disk is full")


@contextmanager
def _using(self, writes):
    with _real_using(self, writes) as db:
        yield _FullDisk(db) if writes and _disk_full() else db


def _save(image, path, **options):
    if _disk_full():
        raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")
    written = _real_save(image, path, **options)
    if image.info.get("fault_slow_save"):
        time.sleep(0.3)
    return written


model_module.PixArtSigmaModel.generate = _generate
store_module.JobStore._using = _using
service_module.save_image = _save

if __name__ == "__main__":
    sys.exit(main())
