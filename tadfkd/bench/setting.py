"""The benchmark's settings and the two paths it compares, built from the run's own config with
random-weight networks (no data or teacher file is needed): the fast path is this project's
``Distiller``; the published-style path is the same with ``PUBLISHED_STYLE`` settings and the
reference's selection (``PublishedStyleScorer``). Also the machine's name for the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from sklearn.mixture import GaussianMixture

from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.precision import cpu_has_bf16
from tadfkd.run.builder import build_distiller
from tadfkd.teachers.loading import random_teacher

CONF = Path(__file__).resolve().parents[2] / "conf"

# The two settings, as overrides of the run's config: the published CIFAR-10 command, and the
# digits default (``--small``), both with random-weight networks.
SETTINGS = {
    "cifar10": ["experiment=cifar10"],
    "small": [],
    "fashion_mnist": ["experiment=fashion_mnist"],
}

# What makes the published-style path: fp32, no channels-last, one batch per refill round.
PUBLISHED_STYLE = [
    "speed.precision=fp32",
    "speed.channels_last=false",
    "speed.refill=single",
    "speed.static_shapes=false",
    "speed.fold_teacher_bn=false",
    "speed.scoring=fp32",
    "speed.generation=fp32",
]


class PublishedStyleScorer:
    """The reference implementation's selection, for timing only (plugged into the
    synthesizer's ``scorer`` seam): the teacher's logits of the whole test view give the
    pseudo-labels, then they are recomputed in chunks of 32 and scikit-learn's
    ``GaussianMixture`` is fitted on the CPU, one batch at a time."""

    def __init__(self, teacher: torch.nn.Module, threshold: float) -> None:
        self.teacher = teacher
        self.threshold = threshold

    @torch.no_grad()
    def __call__(self, test_view: torch.Tensor) -> torch.Tensor:
        labels = self.teacher(test_view).argmax(dim=1)
        logits = torch.cat([self.teacher(chunk) for chunk in test_view.split(32)])
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        losses = losses.cpu().numpy().astype(np.float64)
        span = losses.max() - losses.min()
        if span == 0:  # the reference yields NaN here; keep everything instead
            return torch.ones(test_view.shape[0], dtype=torch.bool, device=test_view.device)
        normalised = ((losses - losses.min()) / span).reshape(-1, 1)
        mixture = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)
        mixture.fit(normalised)
        clean = mixture.predict_proba(normalised)[:, mixture.means_.argmin()]
        return torch.from_numpy(clean > self.threshold).to(test_view.device)


def bench_config(overrides: list[str]) -> DictConfig:
    """The run's config with ``overrides`` (no W&B, no test set needed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, "logger=none"])


def build_path(cfg: DictConfig, device: torch.device, published: bool, seed: int) -> Distiller:
    """The run's ``Distiller`` (published-style: its ``PUBLISHED_STYLE`` settings and scorer)
    with random-weight networks from ``seed``."""
    torch.manual_seed(seed)
    distiller = build_distiller(cfg, random_teacher(cfg.teacher), device)
    if published:
        synthesizer = distiller.synthesizer
        threshold = cfg.selection.threshold
        synthesizer.scorer = PublishedStyleScorer(distiller.inference_teacher, threshold)
    return distiller


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and whether it has bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} (bf16 units: {'yes' if cpu_has_bf16() else 'no'})"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what torch reports elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return str(capabilities.get("cpu_name", "unknown CPU"))
