"""A run's directory: writable, and owned by one process at a time.

A run holds an exclusive lock on ``<run dir>/.lock`` (``flock``) from before Hydra writes into
the directory until the run ends; the kernel releases it when the process exits in any way, so
a lock left by a dead process is never in force. A second process on the same directory ends
with one sentence naming the directory and the process that holds it.

Hydra's record of a run (``.hydra/``: the config, Hydra's settings, the overrides) is written by
the job itself (``hydra.output_subdir`` is null), once the run is accepted: a run refused by
validation, by the identity of the run in the directory or by its lock leaves the directory as
it was.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tadfkd.base.errors import RunDirectoryInUse, UserError, exit_on_known_errors
from tadfkd.base.files import probe_writable, reason, write_text

LOCK_FILE = ".lock"
RECORD_FOLDER = ".hydra"
_held: dict[Path, int] = {}  # run directory -> descriptor of its lock file, held by this process


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and check that files can be written there, or raise a ``UserError``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(run_dir)
    except OSError as error:
        raise UserError(
            f"output directory {run_dir} is not writable ({reason(error)}); set hydra.run.dir "
            "to a directory you can write to."
        ) from None


def lock(run_dir: Path) -> None:
    """Take the run directory's lock for this process (a no-op if it holds it already), or
    raise ``RunDirectoryInUse`` naming the live process that holds it."""
    key = run_dir.resolve()
    if key in _held:
        return
    descriptor = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = lock_owner(descriptor)
        os.close(descriptor)
        raise RunDirectoryInUse(
            f"run directory {key} is in use by another run (process {owner}); wait for it to "
            "end, or set hydra.run.dir to another directory."
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held[key] = descriptor


def lock_owner(descriptor: int) -> str:
    """The process id that the lock's holder writes into the lock file just after taking it
    (waiting up to half a second for it), or ``unknown``."""
    for _ in range(10):
        owner = os.pread(descriptor, 64, 0).decode(errors="replace").strip()
        if owner:
            return owner
        time.sleep(0.05)
    return "unknown"


def unlock(run_dir: Path) -> None:
    """Release the lock this process holds on ``run_dir`` (if any)."""
    descriptor = _held.pop(run_dir.resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the only descriptor releases the flock


def save_hydra_record(run_dir: Path, record: dict[str, str]) -> None:
    """Write a job's Hydra ``record`` (``JobContext.record``) into ``run_dir/.hydra`` (each
    file atomically); a failure of the disk (e.g. full) is one sentence and leaves no partial
    file."""
    folder = run_dir / RECORD_FOLDER
    for name, text in record.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_text(folder / name, text)
        except OSError as error:
            raise UserError(
                f"could not write {folder / name} ({reason(error)}); free some space (or fix "
                "the folder's permissions) and re-run the same command."
            ) from None


class RunDirectory(Callback):
    """Hydra callback (``hydra.callbacks``): before Hydra writes into a single run's directory,
    check that it is writable and take its lock, so that an unwritable or busy directory is a
    one-sentence error with exit code 2, and nothing of the other run is overwritten."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        with exit_on_known_errors():
            ensure_writable(run_dir)
            lock(run_dir)
