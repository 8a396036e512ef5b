"""What a finished job leaves in its run directory: ``results.json`` on success, ``failed.json``
(error and traceback) when a sweep job failed. ``run.py`` writes them; the report reads them.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"


def record_failure(run_dir: Path, error: BaseException, overrides: Sequence[str] = ()) -> Path:
    """Write ``failed.json`` (error type, message, traceback, overrides) and echo it on stderr."""
    text = "".join(traceback.format_exception(error))
    print(text, file=sys.stderr, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FAILED_FILE
    payload = {
        "status": "failed",
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": text,
        "overrides": list(overrides),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def clear_failure(run_dir: Path) -> None:
    """Remove a ``failed.json`` left by an earlier attempt of a job that has now succeeded."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)


def run_status(run_dir: Path) -> str:
    """``done`` (results.json), ``failed`` (failed.json) or ``running`` (neither, yet started)."""
    if (run_dir / RESULTS_FILE).exists():
        return "done"
    if (run_dir / FAILED_FILE).exists():
        return "failed"
    return "running"
