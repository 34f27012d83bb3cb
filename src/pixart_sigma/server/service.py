"""The job queue and its worker: the only caller of the models, one generation at a time.

Requests are validated by the library (same rules, same messages; an edit's pictures read and checked
too) before a job exists; an edit's pictures are stored with its job and handed to the model as files. A random
seed is drawn at submission and stored, so a job queued again after a restart makes the same
pixels. The queue is bounded; progress is kept in memory per job as a list of events that the
server-sent-events route replays from any point; queue positions are not events but derived when
asked (from the one queue), so the cost of a start does not grow with the queue.

Nothing accepted is lost to a storage failure: a job that cannot be marked running stays queued, each
image is listed in the store as soon as its file is complete (a file whose row cannot be written is
removed again), and a job whose end cannot be written (after a few seconds of retries) is failed in
memory, so its waiting clients are told (503, try again) while the store keeps the truth it could record.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
import collections
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import Cancelled, PixArtSigmaError, PixArtSigmaModel, SettingsError, random_seed, save_image
from ..compiling import COMPILE_COST
from ..settings import LOAD_SETTINGS, MAX_SEED, shown
from .protocol import STORE_RETRY_AFTER, Rejected
from . import KEEP_GRACE_SECONDS
from .loras import ServedLoras
from .store import PICTURE_ROLES, Job, JobStore, StoreError, image_name

log = logging.getLogger(__name__)
MAX_IDEMPOTENCY_KEY = 200
KEPT_PROGRESS = 1000  # finished jobs whose event lists stay in memory for late SSE readers
KEPT_UNSAVED = 10_000  # jobs whose end could not be stored, remembered for their clients
STORE_RETRY_SECONDS = (0.2, 1.0, 3.0)  # waits between the tries of one write a job's result depends on
DRAIN_RETRY_AFTER = 5  # seconds a client is asked to wait while the server restarts


@dataclass
class Progress:
    """What a running or recent job has said: events in order, its cancel flag, and who listens.

    Listeners are event-loop events, woken from the worker thread: a stream waits instead of polling,
    so it costs the generating thread nothing.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total: int = 0
    listeners: set = field(default_factory=set)  # (loop, asyncio.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, event: str, **data: Any) -> None:
        with self.lock:
            self.events.append({"event": event, **data})
            listeners = list(self.listeners)
        for loop, woken in listeners:
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # that loop has closed
                pass

    def listen(self, loop, woken) -> None:
        with self.lock:
            self.listeners.add((loop, woken))

    def forget(self, loop, woken) -> None:
        with self.lock:
            self.listeners.discard((loop, woken))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("pixart_queue_depth", "Jobs waiting to run", registry=self.registry)
        self.jobs = Gauge("pixart_jobs", "Jobs in the store by status", ["status"], registry=self.registry)
        self.rejections = Counter("pixart_rejections", "Requests refused, by reason", ["reason"],
                                  registry=self.registry)
        self.step_seconds = Histogram("pixart_step_seconds", "Time of one denoising step", registry=self.registry,
                                      buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.job_seconds = Histogram("pixart_job_seconds", "Time from start to end of a job", registry=self.registry,
                                     buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.out_of_memory = Counter("pixart_out_of_memory", "Jobs failed for lack of device memory",
                                     registry=self.registry)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


class Service:
    """Validates requests, stores jobs, runs them one at a time, and reports on them."""

    def __init__(self, models: dict[str, PixArtSigmaModel], store: JobStore, queue_size: int = 8,
                 keep_jobs: int = 0, keep_grace_seconds: float = KEEP_GRACE_SECONDS, allow_compile: bool = False,
                 lora_dir: Optional[Path] = None):
        if not models:
            raise ValueError("the service needs at least one model")
        self.models = models
        self.default_model = next(iter(models))
        # The LoRA folder requests name LoRAs of (the models' own lora_dir): listed against the default model.
        self.loras = ServedLoras(lora_dir, lambda: self.models[self.default_model].engine.pipeline.transformer.config)
        self.store = store
        self.queue_size = queue_size
        self.keep_jobs = keep_jobs  # finished jobs (and their images) kept; 0 keeps all
        self.keep_grace_seconds = keep_grace_seconds
        self.allow_compile = allow_compile  # compiling costs server time per new size: the operator's choice
        self.metrics = Metrics()
        self.draining = False
        self.ready = False
        self._queue: deque[str] = deque()
        self._running: Optional[str] = None
        self._wake = threading.Condition()
        self._progress: OrderedDict[str, Progress] = OrderedDict()
        self._queue_listeners: set = set()  # (loop, asyncio.Event) of streams that show a queue position
        self._positions: Optional[dict[str, int]] = None  # job id -> queue position, derived when asked
        self._unsaved: OrderedDict[str, Job] = OrderedDict()  # jobs whose end the store could not record
        self._held: collections.Counter[str] = collections.Counter()  # jobs a request still waits for: retention keeps them
        self._handed_out: OrderedDict[str, float] = OrderedDict()  # job id -> when its image URLs last went out
        self._stop = False
        self._worker: Optional[threading.Thread] = None
        self._average_job_seconds = 5.0
        self._writable_checked = (0.0, True)  # (when, result) of the last check for /readyz

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue again what a previous run left queued, then start the worker."""
        for job in self.store.recover():
            if job.model_name not in self.models:  # the server was restarted with other --model-name
                self.store.finish_if(job.id, ("queued",), "failed",
                                     f"model_name={job.model_name!r} is no longer served here "
                                     f"(serving {', '.join(self.models)}); submit it again")
                continue
            self._queue.append(job.id)
            self._progress_of(job.id)
        self._queue_changed()
        # The loaded models never become garbage: keep them out of the collector's sight, so that a
        # collection costs microseconds instead of a quarter second of the event loop.
        gc.collect()
        gc.freeze()
        self._worker = threading.Thread(target=self._work, name="pixart-sigma-worker", daemon=True)
        self._worker.start()
        self.ready = True

    def drain(self) -> None:
        """Take no new jobs; the running one finishes; queued ones stay in the store for the next start."""
        self.draining = True
        self.ready = False
        with self._wake:
            self._stop = True
            self._wake.notify_all()

    def wait_stopped(self, timeout: Optional[float] = None) -> bool:
        if self._worker is not None:
            self._worker.join(timeout)
            return not self._worker.is_alive()
        return True

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, body: Any, pictures: Optional[Mapping[str, bytes]] = None) -> tuple[str, str, dict[str, Any]]:
        """(model_name, prompt, settings) of a request body (and an edit's pictures, role -> bytes), by the
        library's rules; SettingsError otherwise."""
        return validate_request(self.models, self.default_model, body, allow_compile=self.allow_compile,
                                pictures=pictures, loras=self.loras)

    def submit(self, body: Any, idempotency_key: Optional[str] = None,
               pictures: Optional[Mapping[str, bytes]] = None) -> tuple[Job, bool]:
        """Store and queue a job; (job, True) when new, (the earlier job, False) for a repeated Idempotency-Key.
        `pictures`: an edit's (role -> the file's bytes), checked by the library and stored with the job."""
        return self.submit_batches(body, 1, [idempotency_key], pictures)[0]

    def submit_batches(self, body: Any, batches: int, keys: list[Optional[str]],
                       pictures: Optional[Mapping[str, bytes]] = None) -> list[tuple[Job, bool]]:
        """`batches` jobs of one request (A1111's n_iter), each batch's seeds following on from the one before,
        stored and queued together or not at all: (job, new) each. `keys`: each batch's Idempotency-Key or None;
        a repeated request gets its earlier jobs back. `pictures`: an edit's, each job storing its own copy.

        An edit reads its pictures here: call it from a worker thread (asyncio.to_thread), not the event loop."""
        pictures = dict(pictures or {})
        hashed = {"request": body, "pictures": _picture_digests(pictures)} if pictures else body
        hashes = [_request_hash(hashed if index == 0 else {"batch": index + 1, "request": hashed})
                  for index in range(batches)]
        if keys[0] is not None:
            earlier = [self._idempotent(digest, key) for digest, key in zip(hashes, keys)]
            if all(earlier):
                return [(job, False) for job in earlier]
            if any(earlier):  # retention deleted some of them
                raise Rejected(409, "idempotency_conflict", "some jobs of the request with this Idempotency-Key "
                               "were deleted; use a new key", param="Idempotency-Key")
        if self.draining:
            self.metrics.rejections.labels("draining").inc()
            raise Rejected(503, "draining", "the server is shutting down and takes no new jobs; retry shortly",
                           retry_after=DRAIN_RETRY_AFTER)
        try:
            model_name, prompt, settings = self.validate(body, pictures)
        except SettingsError:
            self.metrics.rejections.labels("invalid").inc()
            raise
        with self._wake:
            waiting = len(self._queue) + (1 if self._running else 0)
            if waiting + batches > self.queue_size + 1:  # the running job plus queue_size waiting
                self.metrics.rejections.labels("queue_full").inc()
                room = f"; this request needs {batches} places" if batches > 1 else ""
                raise Rejected(429, "queue_full", f"the queue is full ({self.queue_size} jobs waiting{room}); retry "
                               "later", retry_after=self.retry_after())
            if settings["seed"] == -1:  # drawn now and stored: a job run again after a restart makes the same pixels
                settings["seed"] = random_seed()
            count = settings["num_images_per_prompt"]
            if settings["seed"] + batches * count - 1 > MAX_SEED:
                raise SettingsError([f"seed={settings['seed']} is too large for {batches} batches of {count}: image "
                                     f"seeds follow on and must stay at most {MAX_SEED}"])
            entries = [(model_name, prompt, {**settings, "seed": settings["seed"] + index * count},
                        [settings["seed"] + index * count + k for k in range(count)], key,
                        digest if key is not None else None)
                       for index, (key, digest) in enumerate(zip(keys, hashes))]
            try:
                jobs = self.store.add_many(entries, pictures)
            except sqlite3.IntegrityError:  # the same key raced in from another request
                earlier = [self._idempotent(digest, key) for digest, key in zip(hashes, keys)]
                if not all(earlier):
                    raise Rejected(409, "idempotency_conflict", "another request with this Idempotency-Key is being "
                                   "stored; retry", param="Idempotency-Key") from None
                return [(job, False) for job in earlier]
            except StoreError as exc:
                self.metrics.rejections.labels("store_unwritable").inc()
                raise Rejected(503, "store_unwritable", f"the job could not be stored, so it was not accepted: {exc}; "
                               "retry later", retry_after=STORE_RETRY_AFTER) from None
            for job in jobs:
                self._queue.append(job.id)
                self._progress_of(job.id)  # its stream listens here for "running"
            self._queue_changed()
            self._wake.notify_all()
        return [(job, True) for job in jobs]

    def _idempotent(self, request_hash: str, key: str) -> Optional[Job]:
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise Rejected(400, "invalid", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
                           param="Idempotency-Key")
        earlier = self.store.by_idempotency_key(key)
        if earlier is not None and earlier.request_hash != request_hash:
            raise Rejected(409, "idempotency_conflict",
                           "this Idempotency-Key was used for a different request; use a new key for new work",
                           param="Idempotency-Key")
        earlier = self.current(earlier) if earlier is not None else None
        if earlier is not None and earlier.storage_failed:
            # Its key is released once its failure is recorded; until then a retry cannot be stored either.
            raise Rejected(503, "store_unwritable", f"job {earlier.id} with this Idempotency-Key failed because its "
                           "result could not be stored; retry later with the same key", retry_after=STORE_RETRY_AFTER)
        return earlier

    def cancel(self, job_id: str, release_key: bool = False) -> Optional[Job]:
        """Cancel a queued job at once, a running one within one step; None when there is no such job.

        `release_key`: a queued job withdrawn by the request that made it (A1111's all-or-none batches) frees
        its Idempotency-Key, so a retry of that request makes new jobs instead of replaying cancelled ones.
        """
        job = self.job(job_id)
        if job is None:
            return None
        if not job.done:
            # The flag first: if the worker starts the job between our read and the update below, it still
            # stops before its first step.
            self._progress_of(job_id).cancel.set()
            with self._wake:
                if self.store.finish_if(job_id, ("queued",), "cancelled", "cancelled before it started", release_key):
                    try:
                        self._queue.remove(job_id)
                    except ValueError:
                        pass
                    self._queue_moved()
                    self._progress_of(job_id).emit("done", status="cancelled")
        return self.job(job_id)

    def interrupt_running(self) -> Optional[str]:
        """Cancel whatever job is running now (A1111's interrupt)."""
        job_id = self._running
        if job_id is not None:
            self._progress_of(job_id).cancel.set()
        return job_id

    @contextmanager
    def hold(self, job_ids: list[str]):
        """While a request waits for these jobs (and reads their images), retention keeps them."""
        with self._wake:
            self._held.update(job_ids)
        try:
            yield
        finally:
            with self._wake:
                self._held.subtract(job_ids)
                self._held = +self._held  # drop the zeros

    # -- reading ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> Optional[Job]:
        """A job as it stands: the store's row, or the failure that the store could not record."""
        unsaved = self._unsaved.get(job_id)
        return unsaved if unsaved is not None else self.store.get(job_id)

    def current(self, job: Job) -> Job:
        """A job read from the store, as it stands (the failure the store could not record, if any)."""
        return self._unsaved.get(job.id, job)

    def store_writable(self) -> bool:
        """Whether the store takes writes now (a tiny write, at most every 2 s), for /readyz."""
        when, writable = self._writable_checked
        if time.monotonic() - when > 2 or not writable or not self.store.writable:
            writable = self.store.check_writable()
            self._writable_checked = (time.monotonic(), writable)
        return writable

    def listen_queue(self, loop, woken) -> None:
        with self._wake:
            self._queue_listeners.add((loop, woken))

    def forget_queue(self, loop, woken) -> None:
        with self._wake:
            self._queue_listeners.discard((loop, woken))

    def _queue_changed(self) -> None:
        """The queue's order changed: positions are derived again when next asked (called with `_wake` held)."""
        self._positions = None

    def _queue_moved(self) -> None:
        """Jobs moved up or were put back: positions change; wake the streams that show them (`_wake` held)."""
        self._queue_changed()
        for loop, woken in list(self._queue_listeners):
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # that loop has closed
                pass

    def queue_position(self, job_id: str) -> Optional[int]:
        """1 for the next job to run; None when not queued. Derived once per change of the queue, so many
        streams asking after each start cost one pass over the queue, not one each."""
        with self._wake:
            if self._positions is None:
                self._positions = {queued: position for position, queued in enumerate(self._queue, 1)}
            return self._positions.get(job_id)

    def progress(self, job_id: str) -> Optional[Progress]:
        return self._progress.get(job_id)

    @property
    def running_job(self) -> Optional[str]:
        return self._running

    def queued_count(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free."""
        return max(1, math.ceil(self._average_job_seconds))

    def update_metrics(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        for status, count in self.store.counts().items():
            self.metrics.jobs.labels(status).set(count)

    # -- the worker -------------------------------------------------------------------------------
    def _progress_of(self, job_id: str) -> Progress:
        with self._wake:  # the event loop and the worker both create these
            progress = self._progress.get(job_id)
            if progress is None:
                progress = self._progress[job_id] = Progress()
                while len(self._progress) > KEPT_PROGRESS + self.queue_size + 1:
                    self._progress.popitem(last=False)
            return progress

    def _next(self) -> Optional[str]:
        """The next job to run (None: stop); meanwhile, failures not yet recorded are retried every few seconds."""
        while True:
            self._record_unsaved()
            with self._wake:
                if self._stop:
                    return None
                if self._queue:
                    job_id = self._queue.popleft()
                    self._running = job_id
                    self._queue_moved()
                    return job_id
                unrecorded = any(not job.end_recorded for job in self._unsaved.values())
                self._wake.wait(STORE_RETRY_SECONDS[-1] if unrecorded else None)

    def _work(self) -> None:
        while True:
            job_id = self._next()
            if job_id is None:
                return
            failed = True
            try:
                failed = self._run(job_id) == "failed"
            except StoreError as exc:  # it could not be marked running: it stays first in line
                log.warning("job %s waits: %s", job_id, exc)
                failed = False
                with self._wake:
                    self._running = None
                    self._queue.appendleft(job_id)
                    self._queue_moved()
                    self._wake.wait(STORE_RETRY_SECONDS[-1])  # a drain wakes it at once
            except Exception:  # never let one job stop the worker
                log.exception("job %s: unexpected failure in the worker", job_id)
            finally:
                with self._wake:
                    self._running = None
            if failed:
                # Free what a failure may have left (an out-of-memory error's tensors in reference cycles),
                # here, outside any except block, where no traceback pins them.
                gc.collect()
                _empty_device_cache()

    def _run(self, job_id: str) -> Optional[str]:
        """Run one job; its final status (None when it was cancelled before it started).

        StoreError only when the job could not be read or marked running: it has not started.
        """
        job = self.store.get(job_id)
        if job is None or not self.store.start(job_id):  # cancelled while it waited
            return None
        progress = self._progress_of(job_id)
        started = time.time()
        progress.emit("running")
        last = [time.perf_counter()]

        def on_progress(step: int, total: int) -> None:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            last[0] = now
            progress.step, progress.total = step, total
            progress.emit("progress", step=step, total=total)

        status, error, names, storage_failed = "failed", None, [], False
        try:
            model = self.models[job.model_name]
            pictures = self.store.picture_paths(job)  # an edit's image and mask, as stored with the job
            images = model.generate(job.prompt, on_progress=on_progress, cancel=progress.cancel, **pictures,
                                    **job.settings)
            for index, image in enumerate(images):
                self._save(job_id, image, index, len(images), names)
            status = "succeeded"
        except _StorageFailed as exc:
            storage_failed, error = True, str(exc)
        except Cancelled:
            status, error = "cancelled", f"cancelled at step {progress.step} of {progress.total or '?'}"
        except PixArtSigmaError as exc:
            error = self.loras.private(str(exc))  # a LoRA gone since the job was queued names the folder
        except Exception as exc:
            if _is_out_of_memory(exc):
                self.metrics.out_of_memory.inc()
                error = (f"out of memory ({type(exc).__name__}: {str(exc)[:200]}); try a smaller width x height "
                         "or fewer images per prompt")
            else:
                log.exception("job %s failed", job_id)
                error = self.loras.private(f"{type(exc).__name__}: {exc}")[:2000]
        finished, end_recorded = time.time(), True
        # A job failed by storage frees its Idempotency-Key: a retry with it makes a new job.
        released = {"idempotency_key": None} if storage_failed else {}
        try:
            self._retrying(lambda: self.store.update(job_id, status=status, error=error, finished=finished, **released))
        except StoreError as exc:
            storage_failed, end_recorded = True, False
            status, error = "failed", (f"this job's end could not be recorded ({exc}); it had {status}: submit it "
                                       "again later (same settings, same seed)")
            log.error("job %s: %s", job_id, error)
        if storage_failed:
            status = "failed"
            self._remember_unsaved(replace(job, status=status, error=error, started=started, finished=finished,
                                           images=list(names), storage_failed=True, end_recorded=end_recorded))
        with self._wake:
            self._running = None  # before "done": a client told it is done may submit at once
        self.metrics.job_seconds.observe(finished - started)
        if status == "succeeded":
            self._average_job_seconds = 0.8 * self._average_job_seconds + 0.2 * (finished - started)
        progress.emit("done", status=status)
        if self.keep_jobs:
            self._prune()
        return status

    def _prune(self) -> None:
        """Retention: never what a request waits for, nor what was handed out within the grace period."""
        recent = time.monotonic() - self.keep_grace_seconds
        with self._wake:
            while self._handed_out and next(iter(self._handed_out.values())) < recent:
                self._handed_out.popitem(last=False)
            held = frozenset(self._held) | frozenset(self._handed_out)
        try:
            deleted = self.store.prune(self.keep_jobs, time.time() - self.keep_grace_seconds, held)
        except StoreError as exc:
            log.warning("retention skipped: %s", exc)
            return
        with self._wake:
            for job_id in deleted:
                self._unsaved.pop(job_id, None)

    def handed_out(self, job_ids: list[str]) -> None:
        """These jobs' image URLs just went to a client: retention keeps them for the grace period from now."""
        if not self.keep_jobs:
            return
        now = time.monotonic()
        with self._wake:
            for job_id in job_ids:
                self._handed_out.pop(job_id, None)
                self._handed_out[job_id] = now  # newest last, so the oldest expire first

    def _save(self, job_id: str, image, index: int, count: int, names: list[str]) -> None:
        """Write one image and list it in the job's row; a file whose row cannot be written is removed again."""
        path = self.store.image_dir / image_name(job_id, index)
        try:
            save_image(image, path, overwrite=False)
        except OSError as exc:
            raise _StorageFailed(f"image {index + 1} of {count} could not be written to {self.store.image_dir} "
                                 f"({exc.strerror or exc}); submit the job again later") from None
        try:
            self._retrying(lambda: self.store.update(job_id, images=[*names, path.name]))
        except StoreError as exc:
            path.unlink(missing_ok=True)  # files and rows never disagree
            raise _StorageFailed(f"image {index + 1} of {count} could not be recorded ({exc}); submit the job "
                                 "again later") from None
        names.append(path.name)

    @staticmethod
    def _retrying(write) -> None:
        for wait in (*STORE_RETRY_SECONDS, None):
            try:
                return write()
            except StoreError:
                if wait is None:
                    raise
                time.sleep(wait)

    def _remember_unsaved(self, job: Job) -> None:
        with self._wake:
            self._unsaved[job.id] = job
            while len(self._unsaved) > KEPT_UNSAVED:
                self._unsaved.popitem(last=False)

    def _record_unsaved(self) -> None:
        """Write down the failures the store could not take before, now that it may (between jobs)."""
        with self._wake:
            pending = [job for job in self._unsaved.values() if not job.end_recorded]
        for job in pending:
            try:
                self.store.finish_if(job.id, ("running",), "failed", job.error, release_key=True)
            except StoreError:
                return
            job.end_recorded = True

    # -- views ------------------------------------------------------------------------------------
    def view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it."""
        progress = self._progress.get(job.id)
        return {
            "id": job.id, "status": job.status, "created": job.created, "started": job.started,
            "finished": job.finished, "model_name": job.model_name, "prompt": job.prompt,
            "settings": job.settings, "seeds": job.seeds, "pictures": list(job.pictures),
            "progress": {"step": progress.step if progress else (job.settings["num_inference_steps"] if job.status
                                                                   == "succeeded" else 0),
                         "total": progress.total if progress and progress.total else job.settings["num_inference_steps"]},
            "queue_position": self.queue_position(job.id) if job.status == "queued" else None,
            "images": [{"name": name, "url": f"/v1/images/{name}", "seed": seed}
                       for name, seed in zip(job.images, job.seeds)],
            "error": job.error,
            "links": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"},
        }


def validate_request(models: Mapping[str, Any], default_model: str, body: Any,
                     set_by: str = "pixart-sigma serve --{flag}", allow_compile: bool = False,
                     pictures: Optional[Mapping[str, bytes]] = None,
                     loras: Optional[ServedLoras] = None) -> tuple[str, str, dict[str, Any]]:
    """(model_name, prompt, settings) of a request body, by the library's rules; SettingsError otherwise.

    `models`: each served name and what checks a call for it (`validate_call`, as PixArtSigmaModel's);
    `set_by` says where the server's own settings (device, dtype) are chosen; `allow_compile` False
    refuses compile=true (the operator's choice, see `pixart-sigma serve --allow-compile`). `pictures`: an
    edit's (role -> the file's bytes, as the route received them); a picture named in `body` itself is
    refused, since the library would read it as a path on this machine. `loras`: the served LoRA folder: the
    request's LoRA names are checked against it first (a path or a name it lacks is refused saying what it
    holds), and its place on the server is taken out of every message.
    """
    if not isinstance(body, dict):
        raise SettingsError([f"settings must be a JSON object (the request body), not {type(body).__name__}"])
    values = dict(body)
    problems = []
    for role in PICTURE_ROLES:
        if role in values:
            problems.append(f"{role}={shown(values.pop(role))} is not taken as a value here (a picture is never read "
                            "from a path a request names): send it as a file or in base64 to an edit route")
    fixed = sorted(name for name in LOAD_SETTINGS if name != "model_name" and name in values)
    for name in fixed:
        where = set_by.format(flag=name.replace("_", "-"), name=name)
        problems.append(f"{name} is set by the server ({where}); leave it out of the request")
        values.pop(name)
    model_name = values.pop("model_name", None)
    if model_name is None:
        model_name = default_model
    elif not isinstance(model_name, str) or model_name not in models:
        problems.append(f"model_name={shown(model_name)} is not served here: choose one of {', '.join(models)}")
        model_name = default_model
    missing_prompt = "prompt" not in values
    if missing_prompt:
        problems.append("prompt is missing: describe the image you want, e.g. \"a red fox in the snow\"")
    prompt = values.pop("prompt", "a placeholder, so that only the settings are checked")
    refused: set[int] = set()
    if loras is not None:
        refused, lora_problems = loras.check(values.get("loras"))
        problems += lora_problems
    try:
        prompt, settings = models[model_name].validate_call(prompt, **dict(pictures or {}), **values)
    except SettingsError as exc:  # the entries refused above once, in the server's words
        problems += [problem for problem in exc.problems
                     if not any(problem.startswith(f"loras.{index}.name=") for index in refused)]
        settings = None
    if settings is not None and settings.get("compile") and not allow_compile:
        where = set_by.format(flag="allow-compile", name="allow_compile")
        problems.append(f"compile=true is not allowed on this server: it costs {COMPILE_COST}, so its operator "
                        f"decides ({where}); leave compile out")
    if problems:
        raise SettingsError([loras.private(problem) for problem in problems] if loras is not None else problems)
    return model_name, prompt, settings


def _picture_digests(pictures: Mapping[str, bytes]) -> dict[str, str]:
    """What a request's hash keeps of its pictures: their SHA-256 (role -> hex digest)."""
    return {role: hashlib.sha256(content).hexdigest() for role, content in pictures.items()}


def _request_hash(body: Any) -> str:
    # surrogatepass: a lone surrogate ("\ud800") must reach validation and its 422, not fail here.
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _StorageFailed(Exception):
    """An image could not be written or recorded: the job fails, and its clients are told to retry (503)."""


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


