"""Data-free distillation job: ``python run.py [overrides]`` (see README.md and conf/)."""

import contextlib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tadfkd.base.errors import Interrupted, RunDirectoryInUse, RunStopped, UserError
from tadfkd.run.job import distil
from tadfkd.run.results import clear_failure, echo_traceback, record_failure
from tadfkd.run.rundir import RECORD_FOLDER, hydra_record, save_hydra_record
from tadfkd.run.runtime import command_line_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train one student; returns its final test accuracy (a fraction) for sweepers.

    In a multirun a failed job writes its traceback to ``failed.json`` in its run directory and
    returns None, so that the sweep carries on (the report marks the job failed).
    """
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    record = hydra_record(cfg)  # written into run_dir/.hydra once the run is accepted
    try:
        results = distil(cfg, run_dir, record)
    except Interrupted as stop:  # ends a sweep too; re-running it resumes this job
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as error:
        if hydra_config.mode == RunMode.MULTIRUN:
            # A user mistake reads as in a single run; a bug shows its traceback. Either way
            # failed.json records it and the sweep carries on, except in a directory that
            # another live run holds: that run's files are left as they are.
            if isinstance(error, UserError | RunStopped):
                print(f"error: {error}", file=sys.stderr, flush=True)
            else:
                echo_traceback(error)
            if not isinstance(error, RunDirectoryInUse):
                record_failure(run_dir, error, command_line_overrides())
                if not (run_dir / RECORD_FOLDER).exists():  # the report labels the job by it
                    with contextlib.suppress(UserError):  # failed.json says why, either way
                        save_hydra_record(run_dir, record)
            return None
        if isinstance(error, UserError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if isinstance(error, RunStopped):
            print(f"stopped: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        raise
    clear_failure(run_dir)
    return results["student_final_acc"]


if __name__ == "__main__":
    main()
