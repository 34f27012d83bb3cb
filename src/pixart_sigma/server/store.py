"""The service's only state: jobs in an embedded SQLite database (WAL), images as files beside it.

A job row is written before the job is acknowledged and updated at every change of status, and each
image is listed in its job's row as soon as its file is complete, so a crash or restart loses no job
and no image: on start, queued jobs are queued again, a job that was running is marked `interrupted`
with the reason (running it again could crash-loop a server), and files that no job lists (a crash
between a file and its row) are moved aside. An edit job's pictures (its source image and mask, as
uploaded) are written under names the store makes (`<job id>-image`, `<job id>-mask`) in `uploads/`
before its row, listed in the row, and deleted with it. A store that fails SQLite's check is never written to.
Every SQLite failure comes out as `StoreError`, so callers can answer "try later" instead of crashing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import PixArtSigmaError
from ..images import PARTIAL_PREFIX

log = logging.getLogger(__name__)
STORE_FILE = "jobs.sqlite3"
IMAGE_FOLDER = "images"
ORPHAN_FOLDER = "unlisted-images"  # beside the store: files found in images/ that no job lists
UPLOAD_FOLDER = "uploads"  # edit jobs' pictures, as uploaded
ORPHAN_UPLOAD_FOLDER = "unlisted-uploads"  # beside the store: files found in uploads/ that no job lists
PICTURE_ROLES = ("image", "mask")  # an edit's pictures: the source, and what to repaint
MAX_IMAGE_BYTES = 256 << 20  # far above a 2048x2048 PNG; a file past it is not one of ours
# Names the store makes, and the patterns a request's id or image name must match before any lookup.
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
IMAGE_NAME = re.compile(r"[0-9a-f]{32}-[0-9]{1,3}\.png")


def image_name(job_id: str, index: int) -> str:
    return f"{job_id}-{index}.png"


def upload_name(job_id: str, role: str) -> str:
    """The file name of an edit job's picture (`role`: one of PICTURE_ROLES); never a client's name."""
    return f"{job_id}-{role}"


STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    status TEXT NOT NULL,
    model_name TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    seeds TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    pictures TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY CHECK (id = 1), written REAL NOT NULL);
"""
# A page of the job list starts after this cursor: the (created, id) of the last job of the page before.
CURSOR = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,3})?)_([0-9a-f]{32})")


def _add_pictures_column(db: sqlite3.Connection) -> None:
    """A store made before edits has no `pictures` column: add it (every old job is text-to-image)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "pictures" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN pictures TEXT NOT NULL DEFAULT '{}'")


class FolderInUse(PixArtSigmaError):
    """Another server holds the data folder."""


class StoreDamaged(PixArtSigmaError):
    """The job store failed SQLite's check at start; nothing was written to it."""


class StoreError(PixArtSigmaError):
    """The job store cannot be read or written now (a full disk, an I/O error, a damaged page)."""


def _claim_folder(data_dir: Path):
    """An exclusive lock on the data folder for this process's life: a second server on the same folder
    would mark this one's running job interrupted and run its queued jobs twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one server per folder is then the user's to keep
        return open(data_dir / "lock", "a")
    handle = open(data_dir / "lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise FolderInUse(f"the data folder {data_dir} is in use by another pixart-sigma server; "
                          "give this one its own --data-dir") from None
    return handle


@dataclass
class Job:
    id: str
    created: float
    status: str
    model_name: str
    prompt: str
    settings: dict[str, Any]  # the validated per-call settings (seed already drawn)
    seeds: list[int]
    images: list[str] = field(default_factory=list)  # file names under the image folder
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    idempotency_key: Optional[str] = None
    request_hash: Optional[str] = None
    pictures: dict[str, str] = field(default_factory=dict)  # an edit's pictures: role -> file name under uploads/
    # Never stored: a job the service failed because its images or its end could not be stored.
    storage_failed: bool = False
    end_recorded: bool = True

    @property
    def done(self) -> bool:
        return self.status in FINISHED


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], created=row["created"], status=row["status"], model_name=row["model_name"],
               prompt=row["prompt"], settings=json.loads(row["settings"]), seeds=json.loads(row["seeds"]),
               images=json.loads(row["images"]), started=row["started"], finished=row["finished"],
               error=row["error"], idempotency_key=row["idempotency_key"], request_hash=row["request_hash"],
               pictures=json.loads(row["pictures"]))


def cursor_of(job: Job) -> str:
    """The cursor that starts the page after `job` (repr keeps the float exact)."""
    return f"{job.created!r}_{job.id}"


def _check(path: Path) -> None:
    """StoreDamaged when `path` is not a sound SQLite database; reads only."""
    if not path.exists() or path.stat().st_size == 0:  # new, or created by a start that could write nothing
        return
    advice = (f"move it aside (mv {path} {path}.damaged, and its -wal and -shm files if there are any) and start "
              f"again: a new empty store is made, and the {IMAGE_FOLDER} folder beside it is kept")
    try:
        # as_uri() percent-encodes the path: a '#' or '?' in a folder name must not cut it (or drop mode=ro).
        with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
            rows = [row[0] for row in db.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        raise StoreDamaged(f"the job store {path} cannot be used ({exc}); nothing was written to it: {advice}") from None
    if rows != ["ok"]:
        raise StoreDamaged(f"the job store {path} is damaged (SQLite's check says: {'; '.join(rows)[:300]}); "
                           f"nothing was written to it: {advice}")


class JobStore:
    """Jobs in SQLite; thread-safe (one connection, one lock: every statement is short)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.image_dir = self.data_dir / IMAGE_FOLDER
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir = self.data_dir / UPLOAD_FOLDER
        self.upload_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._claim = _claim_folder(self.data_dir)
        self.path = self.data_dir / STORE_FILE
        self.writable = True  # False from a failed write until the next write that works
        try:
            _check(self.path)  # before the first write: WAL and the schema would write into a damaged file
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a finished job survives a power cut, not only a crash
            self._db.executescript(SCHEMA)
            _add_pictures_column(self._db)
        except sqlite3.Error as exc:
            self._claim.close()
            raise StoreError(f"the job store {self.path} cannot be opened: {exc}") from None
        except BaseException:
            self._claim.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._claim.close()

    @contextmanager
    def _using(self, writes: bool):
        """The connection under the lock; SQLite's failures as StoreError, and whether writes work now."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                if writes:
                    self.writable = False
                action = "written" if writes else "read"
                raise StoreError(f"the job store {self.path} cannot be {action} now: {exc}") from None
            if writes:
                self.writable = True

    def check_writable(self) -> bool:
        """Whether a write works now (a tiny one), for /readyz."""
        try:
            with self._using(writes=True) as db:
                db.execute("INSERT OR REPLACE INTO probe (id, written) VALUES (1, ?)", (time.time(),))
        except StoreError:
            return False
        return True

    def add(self, model_name: str, prompt: str, settings: dict[str, Any], seeds: list[int],
            idempotency_key: Optional[str] = None, request_hash: Optional[str] = None) -> Job:
        return self.add_many([(model_name, prompt, settings, seeds, idempotency_key, request_hash)])[0]

    def add_many(self, entries: list[tuple], pictures: Optional[dict[str, bytes]] = None) -> list[Job]:
        """Queued jobs, all stored or none (one transaction); each entry is (model_name, prompt, settings, seeds,
        idempotency_key, request_hash). They run in the order given, also after a restart.

        `pictures` (an edit's, role -> the file's bytes): each job gets its own copy under uploads/, written and
        made durable before the rows, and removed again when the rows cannot be written.
        """
        now = time.time()
        jobs = [Job(id=uuid.uuid4().hex, created=now + index * 1e-6, status="queued", model_name=model_name,
                    prompt=prompt, settings=settings, seeds=seeds, idempotency_key=key, request_hash=digest)
                for index, (model_name, prompt, settings, seeds, key, digest) in enumerate(entries)]
        written: list[Path] = []
        try:
            for job in jobs:
                for role, content in (pictures or {}).items():
                    written.append(self._write_upload(upload_name(job.id, role), content))
                    job.pictures[role] = written[-1].name
            self._insert(jobs)
        except BaseException:
            for path in written:  # files and rows never disagree
                path.unlink(missing_ok=True)
            raise
        return jobs

    def _write_upload(self, name: str, content: bytes) -> Path:
        """An uploaded picture written atomically and durably (as images are); StoreError when it cannot be."""
        path = self.upload_dir / name
        temporary = self.upload_dir / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:16]}"
        try:
            with open(temporary, "xb") as stream:
                stream.write(content)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise StoreError(f"a picture could not be written to {self.upload_dir}: {exc.strerror or exc}") from None
        return path

    def _insert(self, jobs: list[Job]) -> None:
        with self._using(writes=True) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO jobs (id, created, status, model_name, prompt, settings, seeds, idempotency_key, "
                    "request_hash, pictures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(job.id, job.created, job.status, job.model_name, job.prompt, json.dumps(job.settings),
                      json.dumps(job.seeds), job.idempotency_key, job.request_hash, json.dumps(job.pictures))
                     for job in jobs])
                db.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):  # SQLite may have rolled back by itself already
                    db.execute("ROLLBACK")
                raise

    def picture_paths(self, job: Job) -> dict[str, Path]:
        """An edit job's pictures as paths (role -> path); empty for text-to-image."""
        return {role: self.upload_dir / name for role, name in job.pictures.items()}

    def get(self, job_id: str) -> Optional[Job]:
        with self._using(writes=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def by_idempotency_key(self, key: str) -> Optional[Job]:
        with self._using(writes=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return _job(row) if row else None

    def update(self, job_id: str, **values: Any) -> None:
        encoded = {key: json.dumps(value) if key in ("images", "seeds", "settings") else value
                   for key, value in values.items()}
        assignments = ", ".join(f"{key} = ?" for key in encoded)
        with self._using(writes=True) as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))

    def start(self, job_id: str) -> bool:
        """queued -> running, atomically: False when the job was cancelled meanwhile."""
        with self._using(writes=True) as db:
            cursor = db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ? AND status = 'queued'",
                                (time.time(), job_id))
        return cursor.rowcount == 1

    def finish_if(self, job_id: str, from_statuses: tuple[str, ...], status: str, error: Optional[str] = None,
                  release_key: bool = False) -> bool:
        """Set a final status only when the job is still in one of `from_statuses` (atomic). `release_key`:
        its Idempotency-Key may name new work (a retry of a job that never got its chance)."""
        marks = ", ".join("?" for _ in from_statuses)
        key = ", idempotency_key = NULL" if release_key else ""
        with self._using(writes=True) as db:
            cursor = db.execute(
                f"UPDATE jobs SET status = ?, finished = ?, error = ?{key} WHERE id = ? AND status IN ({marks})",
                (status, time.time(), error, job_id, *from_statuses))
        return cursor.rowcount == 1

    def page(self, limit: int, before: Optional[str] = None) -> tuple[list[Job], int, Optional[str]]:
        """Newest first, from after the cursor `before` (a page's `next`): (jobs, total, the next page's cursor).

        A keyset, not an offset: jobs added or deleted meanwhile never make a job repeat or go missing.
        """
        where, values = "", ()
        if before is not None:
            match = CURSOR.fullmatch(before)
            if match is None:
                raise ValueError(before)
            where, values = "WHERE created < ? OR (created = ? AND id < ?)", (float(match[1]), float(match[1]), match[2])
        with self._using(writes=False) as db:
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created DESC, id DESC LIMIT ?",
                              (*values, limit + 1)).fetchall()
            total = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        jobs = [_job(row) for row in rows[:limit]]
        return jobs, total, cursor_of(jobs[-1]) if len(rows) > limit else None

    def with_status(self, *statuses: str) -> list[Job]:
        """Oldest first."""
        marks = ", ".join("?" for _ in statuses)
        with self._using(writes=False) as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created, id",
                              statuses).fetchall()
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._using(writes=False) as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}

    def prune(self, keep: int, finished_before: float, held: frozenset[str] = frozenset()) -> list[str]:
        """Delete finished jobs beyond the newest `keep` that finished before `finished_before` and are not
        `held` (a request waits for them, or they were just handed out), with their images and pictures; the ids
        deleted.

        Rows go first, then files: a crash in between leaves unlisted files (moved aside at the next
        start), never a job whose images are gone.
        """
        marks = ", ".join("?" for _ in FINISHED)
        with self._using(writes=True) as db:
            rows = db.execute(f"SELECT id, images, pictures, finished FROM jobs WHERE status IN ({marks}) "
                              "ORDER BY created DESC, id DESC LIMIT -1 OFFSET ?", (*FINISHED, keep)).fetchall()
            rows = [row for row in rows if row["id"] not in held and (row["finished"] or 0) < finished_before]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
        for row in rows:
            for name in json.loads(row["images"]):
                (self.image_dir / name).unlink(missing_ok=True)
            for name in json.loads(row["pictures"]).values():
                (self.upload_dir / name).unlink(missing_ok=True)
        return [row["id"] for row in rows]

    def recover(self) -> list[Job]:
        """After a restart: mark jobs that were running as interrupted; return the queued ones, oldest first."""
        for job in self.with_status("running"):
            self.finish_if(job.id, ("running",), "interrupted",
                           "the server stopped while this job was running; submit it again (same settings, same seed)")
        return self.with_status("queued")

    def reconcile(self) -> tuple[int, int]:
        """At start, make the images and uploads folders agree with the store: (files moved aside, partial files
        removed).

        A file no job lists (a crash between a file and its row, or something put there) goes to
        `unlisted-images/` (from uploads/: `unlisted-uploads/`) beside the store, never deleted; a `.partial-*`
        file (a crash while it was written) is removed; links are removed, never followed.
        """
        with self._using(writes=False) as db:
            rows = db.execute("SELECT images, pictures FROM jobs").fetchall()
        images = {name for row in rows for name in json.loads(row["images"])}
        pictures = {name for row in rows for name in json.loads(row["pictures"]).values()}
        moved, removed = self._reconcile_folder(self.image_dir, images, self.data_dir / ORPHAN_FOLDER)
        moved_uploads, removed_uploads = self._reconcile_folder(self.upload_dir, pictures,
                                                                self.data_dir / ORPHAN_UPLOAD_FOLDER)
        return moved + moved_uploads, removed + removed_uploads

    @staticmethod
    def _reconcile_folder(folder: Path, listed: set[str], aside: Path) -> tuple[int, int]:
        """Move what `folder` holds beyond `listed` to `aside`; remove partial files and links."""
        moved = removed = 0
        for entry in os.scandir(folder):
            if entry.name in listed and entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if entry.is_symlink() or (entry.name.startswith(PARTIAL_PREFIX) and entry.is_file(follow_symlinks=False)):
                path.unlink(missing_ok=True)
                removed += 1
                continue
            if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
                raise StoreError(f"{aside} is not a folder: move it away, so that files no job lists can be put "
                                 "there, and start again")
            aside.mkdir(exist_ok=True)
            target = aside / entry.name
            while target.exists():
                target = aside / f"{uuid.uuid4().hex[:8]}-{entry.name}"
            shutil.move(path, target)
            moved += 1
        return moved, removed

    def read_image(self, name: str) -> Optional[bytes]:
        """An image's bytes, or None when `name` is not one of ours or is not a plain file (links are not followed)."""
        if not IMAGE_NAME.fullmatch(name):
            return None
        try:
            # O_NONBLOCK: a FIFO planted under an image's name must not block a thread forever.
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
            handle = os.open(self.image_dir / name, flags)
        except OSError:
            return None
        with os.fdopen(handle, "rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_IMAGE_BYTES:
                return None
            return stream.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]
