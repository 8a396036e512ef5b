"""Data-free distillation job: ``python run.py [overrides]`` (see README.md and conf/)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tadfkd.errors import UserError
from tadfkd.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one student; returns its final test accuracy (a fraction) for sweepers."""
    try:
        results = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return results["student_final_acc"]


if __name__ == "__main__":
    main()
