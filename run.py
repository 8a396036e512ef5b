"""Data-free distillation job: ``python run.py [overrides]`` (see README.md and conf/)."""

import contextlib
import sys

import hydra
from omegaconf import DictConfig

from tadfkd.base.errors import (
    Interrupted,
    RunDirectoryInUse,
    UserError,
    exit_on_known_errors,
    headline,
)
from tadfkd.run.context import JobContext, hydra_context, refuse_keyless_overrides
from tadfkd.run.job import distil
from tadfkd.run.results import clear_failure, echo_traceback, record_failure
from tadfkd.run.rundir import RECORD_FOLDER, save_hydra_record


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train one student; returns its final test accuracy (a fraction) for sweepers.

    In a multirun a failed job writes its traceback to ``failed.json`` in its run directory and
    returns None, so that the sweep carries on (the report marks the job failed).
    """
    context = hydra_context(cfg)
    with exit_on_known_errors():
        try:
            results = distil(cfg, context)
        except Exception as error:
            # a stop signal ends a sweep too; re-running it resumes this job
            if not context.multirun or isinstance(error, Interrupted):
                raise
            record_failed_job(error, context)
            return None
    clear_failure(context.run_dir)
    return results["student_final_acc"]


def record_failed_job(error: Exception, context: JobContext) -> None:
    """A sweep's job failed: a user's mistake reads as in a single run, a bug shows its
    traceback; either way ``failed.json`` records it and the sweep carries on, except in a
    directory that another live run holds: that run's files are left as they are."""
    line = headline(error)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    else:
        echo_traceback(error)
    if isinstance(error, RunDirectoryInUse):
        return
    record_failure(context.run_dir, error, context.overrides)
    if not (context.run_dir / RECORD_FOLDER).exists():  # the report labels the job by it
        with contextlib.suppress(UserError):  # failed.json says why, either way
            save_hydra_record(context.run_dir, context.record)


if __name__ == "__main__":
    with exit_on_known_errors():
        refuse_keyless_overrides(sys.argv[1:])
    main()
