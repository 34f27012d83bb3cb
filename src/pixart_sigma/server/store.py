"""The service's only state: jobs in an embedded SQLite database (WAL), images as files beside it.

A job row is written before the job is acknowledged and updated at every change of status, so a
crash or restart loses no job: on start, queued jobs are queued again and a job that was running
is marked `interrupted` with the reason (running it again could crash-loop a server).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import PixArtSigmaError

# Names the store makes, and the patterns a request's id or image name must match before any lookup.
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
IMAGE_NAME = re.compile(r"[0-9a-f]{32}-[0-9]{1,3}\.png")


def image_name(job_id: str, index: int) -> str:
    return f"{job_id}-{index}.png"


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
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""


class FolderInUse(PixArtSigmaError):
    """Another server holds the data folder."""


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

    @property
    def done(self) -> bool:
        return self.status in FINISHED


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], created=row["created"], status=row["status"], model_name=row["model_name"],
               prompt=row["prompt"], settings=json.loads(row["settings"]), seeds=json.loads(row["seeds"]),
               images=json.loads(row["images"]), started=row["started"], finished=row["finished"],
               error=row["error"], idempotency_key=row["idempotency_key"], request_hash=row["request_hash"])


class JobStore:
    """Jobs in SQLite; thread-safe (one connection, one lock: every statement is short)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.image_dir = self.data_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._claim = _claim_folder(self.data_dir)
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a finished job survives a power cut, not only a crash
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._claim.close()

    def add(self, model_name: str, prompt: str, settings: dict[str, Any], seeds: list[int],
            idempotency_key: Optional[str] = None, request_hash: Optional[str] = None) -> Job:
        job = Job(id=uuid.uuid4().hex, created=time.time(), status="queued", model_name=model_name, prompt=prompt,
                  settings=settings, seeds=seeds, idempotency_key=idempotency_key, request_hash=request_hash)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, created, status, model_name, prompt, settings, seeds, idempotency_key, "
                "request_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.created, job.status, model_name, prompt, json.dumps(settings), json.dumps(seeds),
                 idempotency_key, request_hash))
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def by_idempotency_key(self, key: str) -> Optional[Job]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return _job(row) if row else None

    def update(self, job_id: str, **values: Any) -> None:
        encoded = {key: json.dumps(value) if key in ("images", "seeds", "settings") else value
                   for key, value in values.items()}
        assignments = ", ".join(f"{key} = ?" for key in encoded)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))

    def start(self, job_id: str) -> bool:
        """queued -> running, atomically: False when the job was cancelled meanwhile."""
        with self._lock:
            cursor = self._db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ? AND status = 'queued'",
                                      (time.time(), job_id))
        return cursor.rowcount == 1

    def finish_if(self, job_id: str, from_statuses: tuple[str, ...], status: str, error: Optional[str] = None) -> bool:
        """Set a final status only when the job is still in one of `from_statuses` (atomic)."""
        with self._lock:
            marks = ", ".join("?" for _ in from_statuses)
            cursor = self._db.execute(
                f"UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ? AND status IN ({marks})",
                (status, time.time(), error, job_id, *from_statuses))
        return cursor.rowcount == 1

    def page(self, limit: int, offset: int) -> tuple[list[Job], int]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC, id LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
            total = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return [_job(row) for row in rows], total

    def with_status(self, *statuses: str) -> list[Job]:
        """Oldest first."""
        marks = ", ".join("?" for _ in statuses)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created, id",
                                    statuses).fetchall()
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}

    def prune(self, keep: int) -> int:
        """Delete finished jobs beyond the newest `keep` and their images; how many went.

        Rows go first, then files: a crash in between leaves unlisted files, never a job whose images are gone.
        """
        marks = ", ".join("?" for _ in FINISHED)
        with self._lock:
            rows = self._db.execute(f"SELECT id, images FROM jobs WHERE status IN ({marks}) "
                                    "ORDER BY created DESC, id LIMIT -1 OFFSET ?", (*FINISHED, keep)).fetchall()
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
        for row in rows:
            for name in json.loads(row["images"]):
                (self.image_dir / name).unlink(missing_ok=True)
        return len(rows)

    def recover(self) -> list[Job]:
        """After a restart: mark jobs that were running as interrupted; return the queued ones, oldest first."""
        for job in self.with_status("running"):
            self.finish_if(job.id, ("running",), "interrupted",
                           "the server stopped while this job was running; submit it again (same settings, same seed)")
        return self.with_status("queued")
