"""Shared fixtures: the tiny job config (``debug=tiny``) and a CUDA skip marker. Helpers that
are not fixtures live in ``helpers.py``."""

import pytest
import torch
from helpers import compose_config
from omegaconf import DictConfig


@pytest.fixture
def tiny_job() -> DictConfig:
    """The digits job's own config shrunk by ``debug=tiny`` (seconds on a CPU, no W&B), as
    ``tadfkd.run.job.distil`` receives it; tests add what they need with ``OmegaConf.update``."""
    return compose_config(["debug=tiny", "runtime.device=cpu"], hydra_node=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
