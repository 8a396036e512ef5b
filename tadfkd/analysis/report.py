"""The report over a sweep's jobs (``python -m tadfkd.report``, the sweep callback): computes
the numbers (``statistics``) and writes ``report.md`` (``markdown``; percent), ``report.csv``
(per method and accuracy), ``pairs.csv`` (paired differences between methods), ``runs.csv`` (per
job; fractions in the CSVs), ``curves.png`` and ``health.png`` (``plots``). Partial sweeps are
fine: jobs still running, failed jobs and unreadable run directories are counted and listed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tadfkd.analysis.finding import Reference
from tadfkd.analysis.jobs import Run, ceiling_of, check_ceiling_file
from tadfkd.analysis.launches import sweep_wall_time
from tadfkd.analysis.markdown import report_markdown
from tadfkd.analysis.plots import plot_curves, plot_health
from tadfkd.analysis.statistics import DEFAULT_COLLAPSE_BELOW, method_summary, paired_differences
from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.base.files import reason

# runs.csv: a job's time as the sum of its epochs' ``time/epoch_s`` (every launch of a resumed
# run; ``wall_time_s`` counts its last launch only)
EPOCHS_TIME = "epochs_time_s"
RUN_FIELDS = ["job", "status", "dataset", "teacher", "student", "method", "seed"]
RUN_FIELDS += [schema.TEACHER_ACC_FIELD, *schema.ACCURACY_FIELDS, *schema.HEALTH]
RUN_FIELDS += [EPOCHS_TIME, schema.WALL_TIME, "error"]


def run_row(run: Run) -> dict[str, Any]:
    """One job's line of ``runs.csv`` (fractions; empty where not measured)."""
    return {
        "job": run.name,
        "status": run.status,
        "dataset": run.dataset,
        "teacher": run.teacher,
        "student": run.student,
        "method": run.method,
        "seed": run.seed,
        "error": run.error,
        **{
            key: run.results.get(key) for key in (*schema.ACCURACY_FIELDS, schema.TEACHER_ACC_FIELD)
        },
        EPOCHS_TIME: run.epochs_time,
        schema.WALL_TIME: run.results.get(schema.WALL_TIME),
        **run.final_health,
    }


def write_csvs(
    runs: Sequence[Run],
    summary: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    out: Path,
) -> None:
    """``report.csv``, ``pairs.csv`` and ``runs.csv`` into ``out``."""
    for name, rows in (("report.csv", summary), ("pairs.csv", pairs)):
        with (out / name).open("w", newline="") as handle:
            fields = list(rows[0]) if rows else ["method"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_FIELDS)
        writer.writeheader()
        writer.writerows(run_row(run) for run in runs)


def write_report(
    runs: Sequence[Run],
    source: str,
    out: Path,
    collapse_below: float = DEFAULT_COLLAPSE_BELOW,
    ceiling_file: Path | None = None,
    references: Sequence[Reference] = (),
) -> list[dict[str, Any]]:
    """Write report.md, report.csv, pairs.csv, runs.csv, curves.png and health.png into
    ``out``; returns the per-method summary rows (fractions). ``references``: published figures
    the report's finding compares the best method with."""
    if not 0 < collapse_below <= 1:
        raise UserError(f"--collapse-below={collapse_below} must be a fraction in (0, 1].")
    check_ceiling_file(ceiling_file)
    done = [run for run in runs if run.status == "done"]
    ceiling = None
    if done and len({(run.dataset, run.student) for run in done}) == 1:
        ceiling = ceiling_of(done[0].dataset, done[0].student, ceiling_file)
    summary = method_summary(runs, collapse_below)
    pairs = paired_differences(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csvs(runs, summary, pairs, out)
        launches = sweep_wall_time(Path(source)) if Path(source).is_dir() else None
        text = report_markdown(
            source, runs, summary, pairs, ceiling, collapse_below, launches, references
        )
        (out / "report.md").write_text(text)
        plot_curves(runs, out / "curves.png", ceiling)
        plot_health(runs, out / "health.png")
    except OSError as error:
        raise UserError(
            f"the report cannot be written into {out} ({reason(error)}); pass --out a folder "
            "you can write to."
        ) from None
    return summary
