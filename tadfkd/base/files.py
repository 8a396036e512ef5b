"""Writing files so that a reader (or a resumed run) never sees half of one.

Every write goes to ``<target name>.tmp`` inside a fresh private folder beside the target (so no
two processes or threads ever share a temporary name, and ``torch.save``, which names its archive
after the file minus its last suffix, writes the same bytes whatever the folder), is flushed to
disk, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ``write_temporary``'s private folder: ``.<target name>.<8 characters of tempfile.mkdtemp>``
TEMPORARY_FOLDER = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}")


def reason(error: OSError) -> str:
    """What went wrong with a file, in words (e.g. "No space left on device")."""
    return os.strerror(error.errno) if error.errno else str(error)


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_bytes(path: Path, data: bytes) -> None:
    """Write all of ``data`` to ``path`` with ``os.write`` (``write_temporary`` fsyncs it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)


def write_temporary(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` for a ``temporary`` named ``<path name>.tmp`` in a new private folder
    beside ``path``, fsynced; returns it for ``publish``. On failure nothing is left behind."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    temporary = folder / f"{path.name}.tmp"
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return temporary


def publish(temporary: Path, path: Path) -> None:
    """Rename ``write_temporary``'s file over ``path`` and remove its private folder."""
    os.replace(temporary, path)
    with contextlib.suppress(OSError):
        temporary.parent.rmdir()
    fsync_directory(path.parent)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` by ``write(temporary)`` then a rename; on failure ``path`` is untouched."""
    publish(write_temporary(path, write), path)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    replace_atomically(path, lambda temporary: write_bytes(temporary, text.encode()))


def write_json(path: Path, payload: dict[str, Any], sort_keys: bool = False) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the private folders that ``write_temporary`` left in ``directory`` when its process
    was killed mid-write (each holding at most its ``<target>.tmp``); returns them. Only for a
    directory this process holds (``rundir.lock``): a live writer's folder looks the same."""
    removed = []
    for folder in directory.glob(".*.*"):
        match = TEMPORARY_FOLDER.fullmatch(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir():
            continue
        if {path.name for path in folder.iterdir()} <= {f"{match['target']}.tmp"}:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def probe_writable(directory: Path) -> None:
    """Raise the ``OSError`` of creating a file in ``directory`` (which must exist), if any."""
    descriptor, name = tempfile.mkstemp(prefix=".write-test.", dir=directory)
    os.close(descriptor)
    os.unlink(name)
