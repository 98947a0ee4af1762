"""The files of a run directory, named in one place, and the small writers that touch them.

    config.yaml            the fully resolved config
    metrics.jsonl          one JSON record per log/eval step (the W&B keys)
    predictions.npz        per-example labels and scores of every evaluated set at every evaluation
    summary.json           the run's results, or ``"status": "failed"`` (or ``"interrupted"``, SIGTERM) and why
    adapter.safetensors    what trained, with the metadata to rebuild the model
    adapter_best.safetensors   the same at the best evaluation (trainer.keep_best; its step in the metadata)
    checkpoint.pt          the training checkpoint while the run is unfinished
    checkpoint.previous.pt the one before it (resume falls back to it if checkpoint.pt is damaged)
    run.lock               locked (flock) by the process running in the dir, with its pid, host and start (``owned``)
    run.log, .hydra/       Hydra's log and the unresolved config and overrides
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.npz"
SUMMARY = "summary.json"
ADAPTER = "adapter.safetensors"
ADAPTER_BEST = "adapter_best.safetensors"
CHECKPOINT = "checkpoint.pt"
LOG = "run.log"
LOCK = "run.lock"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


def remove_if_unused(run_dir: Path) -> bool:
    """Remove a run dir that holds nothing but what Hydra wrote when the job started (``.hydra/``
    and ``run.log``) and a released (empty) ``run.lock``: a run refused by its config check leaves
    no empty dir behind."""
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= {".hydra", LOG, LOCK}:
        return False
    if (run_dir / LOCK).is_file() and (run_dir / LOCK).stat().st_size:  # someone else's live record
        return False
    shutil.rmtree(run_dir)
    return True


class InUse(RuntimeError):
    """Another live process owns the run dir (its ``run.lock``); ``owner`` says which."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]):
        self.owner = f"pid {holder['pid']} on {holder['host']} (since {holder['started']})"
        super().__init__(f"{run_dir} is in use by {self.owner}; wait for that run to end, or use another run dir")


@contextmanager
def owned(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` while the block runs: an exclusive ``flock`` on ``run.lock``, which the
    kernel releases when the process ends however it ends (SIGKILL, a Slurm time limit), so a
    lock is never stale; the file holds the owner's pid, host and start for the message
    (``InUse``) and is emptied, not removed, at the end. A record left by a process that died is
    taken over with a warning naming it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, path, fcntl.LOCK_EX, wait_s=1.0)  # (another process's check_free holds it for a moment)
        gone = _read_lock(path)
        if gone is not None:
            logging.getLogger(__name__).warning("%s: taking over the lock of a run that is gone (pid %s on %s)",
                                                run_dir, gone["pid"], gone["host"])
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        yield
    finally:
        try:
            os.ftruncate(fd, 0)  # free: the next owner finds no record of a run that died
        except OSError as err:  # a read-only dir: the error that ended the run is the one to report
            logging.getLogger(__name__).warning("%s could not be cleared: %s", path, err)
        os.close(fd)


def check_free(run_dir: Path) -> None:
    """``InUse``, in one line, if a live process holds ``run_dir``'s lock. The look is a shared
    lock (it conflicts with the owner's exclusive one, and NFS, which emulates ``flock`` with POSIX
    locks, grants it on a read-only file); where the file system cannot lock, it says nothing
    and ``owned`` reports the error when the run takes the lock."""
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: never run, or a dir this process cannot read (the run says so)
        return
    try:
        _lock(fd, path, fcntl.LOCK_SH)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases it: this was only a look


def _lock(fd: int, path: Path, mode: int, wait_s: float = 0.0) -> None:
    """``flock(mode)`` on ``fd``, trying again for ``wait_s``; ``InUse`` naming the holder after that."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _read_lock(path) or {"pid": "?", "host": "?", "started": "?"}
                raise InUse(path.parent, holder) from None
            time.sleep(0.05)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= holder.keys() else None


def pid_running(pid: int) -> bool:
    """A process with this pid runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_refused_resume(hydra_dir: Path) -> None:
    """Remove the ``.hydra/resumed_<n>/`` of a resume that was refused, so the next
    ``resume=<run dir>`` takes the overrides of the last one that trained."""
    if hydra_dir.parent.name == ".hydra" and hydra_dir.name.startswith("resumed_"):
        shutil.rmtree(hydra_dir, ignore_errors=True)


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it is flushed to disk and renamed over
    ``path``, so a reader (or a kill, or a full disk) sees the old file or the whole new one, never
    a part; on failure the temporary file is removed and the error goes on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a file-size limit, a read-only dir: say which file
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise OSError(err.errno, f"{err.strerror} while writing {path} ({kept})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (``atomic``)."""
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


class UnreadableSummary(ValueError):
    """A summary.json that is not a JSON object (cut short, empty, corrupt): the run did not complete."""


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary, None without one; ``UnreadableSummary`` (naming the file) if it cannot be read."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableSummary(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(summary, dict):
        raise UnreadableSummary(f"{path} is unreadable (not a JSON object)")
    return summary


def truncate_metrics(run_dir: Path, step: int) -> list[str]:
    """Drop the records written after ``step`` (a resumed run writes them again), and any line
    that is not a whole record (a write cut short by a kill or a full disk); returns a warning
    per dropped line, naming the file and line."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    kept, warnings = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            if line.strip():
                warnings.append(f"{path} line {number} is not a whole record ({line[:40]!r}...): dropped")
            continue
        if record["step"] <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
    return warnings


def read_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    """``predictions.npz`` as a dict: ``<set>.labels`` (n,) once per eval set, and
    ``<set>.step<N>`` the scores at step N, logits (n, classes) or the regression output (n,)."""
    path = run_dir / PREDICTIONS
    if not path.is_file():
        return {}
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


def write_predictions(run_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace ``predictions.npz`` atomically (a run killed mid-write keeps the old file)."""
    with atomic(run_dir / PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def predictions_step(key: str) -> int | None:
    """N of a ``<set>.step<N>`` key; None for ``<set>.labels``."""
    match = re.fullmatch(r".+\.step(\d+)", key)
    return int(match.group(1)) if match else None


def truncate_predictions(run_dir: Path, step: int) -> None:
    """Drop the evaluations after ``step`` (a resumed run makes them again)."""
    arrays = read_predictions(run_dir)
    kept = {k: v for k, v in arrays.items() if (predictions_step(k) or 0) <= step}
    if kept != arrays:
        write_predictions(run_dir, kept)
