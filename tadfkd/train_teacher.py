"""Teacher training job, the other entry point: ``python -m tadfkd.train_teacher [overrides]``
(README.md, "Using your own teacher"); what it does is tadfkd.run.teacher_job."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tadfkd.base.errors import UserError
from tadfkd.run.checks import validate
from tadfkd.run.rundir import hydra_record
from tadfkd.run.runtime import check_resolvable, command_line_overrides
from tadfkd.run.teacher_job import output_path, train_teacher


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_teacher")
def main(cfg: DictConfig) -> float:
    """Entry point; returns the teacher's test accuracy (a fraction) for sweepers."""
    try:
        hydra_cfg = HydraConfig.get()
        overrides = command_line_overrides()
        command = " ".join(["python -m tadfkd.train_teacher", *overrides])
        check_resolvable(cfg)
        validate(cfg)  # before its values name the output file
        output = output_path(cfg, overrides)
        record = hydra_record(cfg)
        metadata = train_teacher(cfg, Path(hydra_cfg.runtime.output_dir), output, command, record)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return metadata["test_acc"]


if __name__ == "__main__":
    main()
