"""What a finished job leaves in its run directory, and what it says when it ends.

``results.json`` (fields in ``tadfkd.base.schema``) and ``student.pt`` on success; ``failed.json``
(error and traceback) when a sweep job failed. ``run.py`` writes them; the report reads them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.base.files import reason, replace_atomically, write_json

FAILED_FILE = schema.FAILED_FILE
RESULTS_FILE = schema.RESULTS_FILE
STUDENT_FILE = "student.pt"

log = logging.getLogger(__name__)


def summarise(accuracies: Sequence[float | None], teacher_acc: float | None) -> dict[str, Any]:
    """Final, best-epoch (test-set selection) and last-``LAST_K`` mean accuracy, as fractions;
    None where nothing was measured (no test set)."""
    measured = [accuracy for accuracy in accuracies if accuracy is not None]
    return {
        schema.FINAL_ACC: measured[-1] if measured else None,
        schema.BEST_ACC: max(measured, default=None),
        schema.LAST_K_ACC: float(np.mean(measured[-schema.LAST_K :])) if measured else None,
        schema.TEACHER_ACC_FIELD: teacher_acc,
    }


def percent(
    fraction: float | None, digits: int = 2, sign: str = "%", missing: str = "not measured"
) -> str:
    """A fraction as a percentage with ``digits`` decimals and ``sign``, or ``missing`` when it
    was not measured (None or NaN)."""
    if fraction is None or math.isnan(fraction):
        return missing
    return f"{100 * fraction:.{digits}f}{sign}"


def _written(path: Path, write: Callable[[], None]) -> None:
    """Run ``write`` for ``path``; a failure of the disk (e.g. full) is one sentence."""
    try:
        write()
    except OSError as error:
        raise UserError(
            f"could not write {path} ({reason(error)}); the run's checkpoint is intact, so free "
            "some space and re-run the same command to write it."
        ) from None


def save_student(run_dir: Path, model: torch.nn.Module) -> Path:
    """The student's final weights as ``student.pt`` (a plain CPU state dict, no
    ``torch.compile`` prefix), written atomically."""
    model = getattr(model, "_orig_mod", model)
    state_dict = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    path = run_dir / STUDENT_FILE
    _written(path, lambda: replace_atomically(path, lambda tmp: torch.save(state_dict, tmp)))
    return path


def save_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """``results.json``, atomically."""
    path = run_dir / RESULTS_FILE
    _written(path, lambda: write_json(path, results))
    return path


def is_fraction(value: Any) -> bool:
    """A measured accuracy or rate: a finite number in [0, 1] (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 1
    )


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def results_problem(results: Any) -> str | None:
    """Why ``results`` (as read from a ``results.json``) cannot be trusted, in a few words, or
    None: every field that a report or a re-run reads has its type and range (accuracies and
    health signals fractions in [0, 1] or null, labels text, the seed a whole number, times
    seconds), since the file may have been edited, damaged or written by other code."""
    if not isinstance(results, dict):
        return f"it holds a {type(results).__name__}, not an object of fields"
    for key in ("dataset", "teacher", "student", "method"):
        if not isinstance(results.get(key), str):
            return f"{key} is {results.get(key)!r}, not text"
    seed = results.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return f"seed is {seed!r}, not a whole number"
    for key in (*schema.ACCURACY_FIELDS, schema.TEACHER_ACC_FIELD):
        if key not in results:
            return f"{key} is missing"
        if results[key] is not None and not is_fraction(results[key]):
            return f"{key} is {results[key]!r}, not a fraction in [0, 1]"
    accuracies = results.get(schema.EPOCH_ACCS)
    if not isinstance(accuracies, list) or not all(a is None or is_fraction(a) for a in accuracies):
        return f"{schema.EPOCH_ACCS} is not a list of fractions in [0, 1]"
    history = results.get(schema.HISTORY, [])
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        return f"{schema.HISTORY} is not a list of per-epoch objects"
    for row in history:
        for key in (*schema.HEALTH, schema.STUDENT_ACC):
            if row.get(key) is not None and not is_fraction(row[key]):
                return f"{schema.HISTORY}'s {key} is {row[key]!r}, not a fraction in [0, 1]"
        if row.get(schema.EPOCH_SECONDS) is not None and not _seconds(row[schema.EPOCH_SECONDS]):
            return f"{schema.HISTORY}'s {schema.EPOCH_SECONDS} is {row[schema.EPOCH_SECONDS]!r}"
    if results.get(schema.WALL_TIME) is not None and not _seconds(results[schema.WALL_TIME]):
        return f"{schema.WALL_TIME} is {results[schema.WALL_TIME]!r}, not a number of seconds"
    if results.get("commit") is not None and not isinstance(results["commit"], str):
        return f"commit is {results['commit']!r}, not text"
    return None


def load_results(run_dir: Path) -> dict[str, Any]:
    """``results.json`` of ``run_dir``; ``ValueError`` (with the reason) when it is not valid
    JSON or not trustworthy results (``results_problem``), ``OSError`` when it cannot be read."""
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    problem = results_problem(results)
    if problem is not None:
        raise ValueError(problem)
    return results


def print_done(results: dict[str, Any], run_dir: Path) -> None:
    """The closing line of a run (console and ``run.log``): its accuracies and where
    ``results.json`` is."""
    where = run_dir / RESULTS_FILE
    if results[schema.FINAL_ACC] is None:
        log.info(
            "done: trained without a test set, so no accuracy was measured (null in "
            f"results.json); results in {where}"
        )
        return
    log.info(
        f"done: student final test accuracy {100 * results[schema.FINAL_ACC]:.2f}% "
        f"({schema.last_k_label(len(results[schema.EPOCH_ACCS]))} "
        f"{100 * results[schema.LAST_K_ACC]:.2f}%, best epoch "
        f"{100 * results[schema.BEST_ACC]:.2f}% [test-set selection]); teacher "
        f"{percent(results[schema.TEACHER_ACC_FIELD])}; results in {where}"
    )


def record_failure(run_dir: Path, error: BaseException, overrides: Sequence[str] = ()) -> Path:
    """Write ``failed.json`` (error type, message, traceback, overrides)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FAILED_FILE
    payload = {
        "status": "failed",
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "overrides": list(overrides),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(path, payload)
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


def echo_traceback(error: BaseException) -> None:
    """The traceback of ``error`` on stderr (a sweep job's log)."""
    print("".join(traceback.format_exception(error)), file=sys.stderr, flush=True)
