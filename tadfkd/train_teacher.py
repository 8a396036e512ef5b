"""Teacher training job, the other entry point: ``python -m tadfkd.train_teacher [overrides]``
(README.md, "Using your own teacher"); what it does is tadfkd.run.teacher_job."""

import sys

import hydra
from omegaconf import DictConfig

from tadfkd.base.errors import exit_on_known_errors
from tadfkd.run.checks import validate
from tadfkd.run.context import hydra_context, refuse_keyless_overrides
from tadfkd.run.runtime import check_resolvable
from tadfkd.run.teacher_job import output_path, train_teacher


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_teacher")
def main(cfg: DictConfig) -> float:
    """Entry point; returns the teacher's test accuracy (a fraction) for sweepers."""
    context = hydra_context(cfg)
    with exit_on_known_errors():
        check_resolvable(cfg)
        validate(cfg)  # before its values name the output file
        output = output_path(cfg, context.overrides)
        metadata = train_teacher(cfg, context, output)
    return metadata["test_acc"]


if __name__ == "__main__":
    with exit_on_known_errors():
        refuse_keyless_overrides(sys.argv[1:])
    main()
