"""Shared fixtures: composing the real config tree, and a CUDA skip marker."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose_config(overrides: list[str] = (), config_name: str = "config") -> DictConfig:
    """The config ``run.py`` would see with these command-line overrides (hydra node included)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def options(group: str) -> list[str]:
    """Every option of a config group, by file name."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
