"""Shared fixtures: the tiny job config (``debug=tiny``), the thread counts restored after each
test, the C kernels a test calls, and a CUDA skip marker. Helpers that are not fixtures live
in ``helpers.py``."""

import pytest
import torch
from helpers import compose_config
from omegaconf import DictConfig
from threadpoolctl import threadpool_limits

from tadfkd.models import kernels


@pytest.fixture(autouse=True)
def threads_restored():
    """Jobs and benchmarks set torch's threads and numpy's BLAS pool (``set_threads``) for the
    process: each test leaves them as it found them."""
    threads = torch.get_num_threads()
    with threadpool_limits(limits=None, user_api="blas"):  # restores the BLAS limits on exit
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread, where every C kernel applies (``tadfkd.models.kernels.may_run``)
    whatever the machine's cores; ``threads_restored`` puts the count back."""
    torch.set_num_threads(1)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The C kernels (``tadfkd.models.kernels``) the test calls, by name, in order."""
    calls, run_kernel = [], kernels.run_kernel
    monkeypatch.setattr(
        kernels, "run_kernel", lambda name, *args: calls.append(name) or run_kernel(name, *args)
    )
    return calls


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
