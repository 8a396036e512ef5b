"""A multirun from launch to report: the Hydra callback around a sweep.

Before any job (``plan=true``): list the jobs the sweep would launch, with their overrides, and
stop. Each launch is recorded in the sweep directory (``launches``: a sweep relaunched after an
interruption sums its sittings' wall time). After the last job, whatever happened: one summary
line (jobs done / failed / total, the failed jobs' directories, the report's path), the report
written into the sweep directory when ``report`` is true (the presets set it), and an exit code
that is not 0 when the sweep is not complete: 5 when a job failed, else 6 when a job was left
unrun (e.g. another launch held it), else 7 when the report could not be written, with one
sentence saying which.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tadfkd.analysis.launches import record_launch
from tadfkd.base.errors import UserError
from tadfkd.run.runtime import cpu_name

FAILED_JOBS_EXIT_CODE = 5
UNFINISHED_JOBS_EXIT_CODE = 6
REPORT_FAILED_EXIT_CODE = 7


def planned_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job the multirun of ``config`` launches, in order: the
    sweeper's ``params`` (a preset's grid), then the command line, as Hydra's basic sweeper
    expands them (globs included)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def summary_line(sweep_dir: Path, report_path: Path | None) -> tuple[str, int, int]:
    """``sweep: N jobs, D done, F failed (dirs), R not finished (dirs); report: path``, the
    number failed and the number not finished."""
    from tadfkd.analysis.jobs import read_sweep_directory

    try:
        runs = read_sweep_directory(sweep_dir)
    except (UserError, OSError):
        runs = []
    done = sum(run.status == "done" for run in runs)
    failed = [run for run in runs if run.status in ("failed", "unreadable")]
    running = [run for run in runs if run.status == "running"]
    line = f"sweep {sweep_dir}: {len(runs)} jobs, {done} done, {len(failed)} failed"
    if failed:
        line += " (" + ", ".join(str(sweep_dir / run.name) for run in failed) + ")"
    if running:  # e.g. held by another live launch of the same sweep: not this launch's failure
        names = ", ".join(str(sweep_dir / run.name) for run in running)
        line += f", {len(running)} not finished ({names})"
    if report_path is not None:
        line += f"; report: {report_path}"
    return line, len(failed), len(running)


def incomplete(failed: int, unfinished: int, report_error: str | None) -> tuple[str, int] | None:
    """One sentence on what keeps the sweep from being complete, and its exit code (the first
    of: a job failed, a job left unrun, the report not written); None when it is complete."""
    problems = []
    if failed:
        problems.append((f"{failed} job{'s' if failed > 1 else ''} failed", FAILED_JOBS_EXIT_CODE))
    if unfinished:
        problems.append(
            (
                f"{unfinished} job{'s were' if unfinished > 1 else ' was'} left unrun or "
                "unfinished (another launch holds it, or it was stopped; re-run the same command "
                "to finish it)",
                UNFINISHED_JOBS_EXIT_CODE,
            )
        )
    if report_error is not None:
        problems.append(
            (f"the report could not be written ({report_error})", REPORT_FAILED_EXIT_CODE)
        )
    if not problems:
        return None
    words = [text for text, _ in problems]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    code = problems[0][1]
    return f"error: the sweep is not complete: {listed}; exit code {code}.", code


def is_teacher_job(config: DictConfig) -> bool:
    """Whether a multirun is the teacher job's (it writes teacher files, no results to report)."""
    return "recipe" in config


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks``) around a multirun: the plan, the summary line, the
    report and the exit code."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("plan"):
            if not is_teacher_job(config):
                record_launch(Path(str(config.hydra.sweep.dir)), "started", cpu_name())
            return
        try:
            jobs = planned_jobs(config)
            print(f"plan: {len(jobs)} jobs into {config.hydra.sweep.dir} (nothing is launched)")
            for number, overrides in enumerate(jobs):
                shown = [item for item in overrides if not item.startswith(("plan=", "sweep="))]
                print(f"  #{number} {' '.join(shown)}")
        finally:  # even when printing fails (a closed pipe): Hydra would go on and launch
            sys.exit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_teacher_job(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        record_launch(sweep_dir, "ended")
        report_path, report_error = None, None
        if config.get("report"):
            from tadfkd.analysis.jobs import read_sweep_directory
            from tadfkd.analysis.report import write_report

            try:
                write_report(read_sweep_directory(sweep_dir), str(sweep_dir), sweep_dir)
                report_path = sweep_dir / "report.md"
            except UserError as error:
                report_error = str(error).rstrip(".")
            except Exception as error:  # noqa: BLE001 - a bug in the report must not hide the sweep's outcome
                report_error = f"{type(error).__name__}: {error}"
        line, failed, unfinished = summary_line(sweep_dir, report_path)
        print(line, flush=True)
        outcome = incomplete(failed, unfinished, report_error)
        if outcome is not None:
            print(outcome[0], file=sys.stderr, flush=True)
            sys.exit(outcome[1])
