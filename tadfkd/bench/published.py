"""The benchmark's published-style path: the settings and the selection of the reference
implementation, for timing (and the selection rule for ``--agreement``'s yardstick too). Its
scoring forward recomputes the teacher's logits in chunks of 32, its selection rule (named by
``selection._target_``, as any rule is) fits scikit-learn's mixture on the CPU, and its
BN-statistics term computes the variance of a transposed copy.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import nn

from tadfkd.distillation.selection import GMMSelection, Selection, pseudo_label_loss
from tadfkd.distillation.terms import BNStatistics

# What makes the published-style path: fp32, no channels-last, one batch per refill round,
# the reference's mixture fit.
PUBLISHED_STYLE = [
    "selection._target_=tadfkd.bench.published.ScikitLearnGMMSelection",
    "speed.precision=fp32",
    "speed.channels_last=false",
    "speed.refill=single",
    "speed.static_shapes=false",
    "speed.fold_teacher_bn=false",
    "speed.scoring=fp32",
    "speed.generation=fp32",
    "speed.depthwise_output=false",
    "speed.phased_upsampling=false",
    "speed.fused_generation=false",
    "speed.single_channel_conv=false",
    "speed.fused_pooling=false",
    "speed.mixture_kernel=false",
    "speed.batch_norm_kernel=false",
    "speed.output_conv_kernel=false",
    "speed.single_channel_training=false",
    "speed.winograd_conv=false",
]


def published_style(cfg: DictConfig) -> DictConfig:
    """``cfg`` (composed with ``PUBLISHED_STYLE``), changed in place and returned, with the
    method's BN-statistics term, if it has one, computed the reference's way."""
    terms = cfg.method.get("generator_terms") or {}
    for name, term in terms.items():
        if term.get("_target_") == "tadfkd.distillation.terms.BNStatistics":
            cfg.method.generator_terms[name]._target_ = f"{__name__}.PublishedBNStatistics"
    return cfg


def published_bn_statistics_term(module: nn.BatchNorm2d, inputs: torch.Tensor) -> torch.Tensor:
    """The reference's statistics of one BatchNorm2d layer's input: the variance of the
    channel-major copy ``x.permute(1, 0, 2, 3).contiguous().view(C, -1)``."""
    x = inputs.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.permute(1, 0, 2, 3).contiguous().view(x.shape[1], -1).var(dim=1, unbiased=False)
    return (module.running_var - var).norm() + (module.running_mean - mean).norm()


class PublishedBNStatistics(BNStatistics):
    """``BNStatistics`` with the reference's computation of the statistics, for timing only."""

    statistic = staticmethod(published_bn_statistics_term)


class ScikitLearnGMMSelection(GMMSelection):
    """The reference implementation's mixture: scikit-learn's ``GaussianMixture`` fitted on the
    CPU to each chunk's min-max normalised pseudo-label loss, with ``GMMSelection``'s settings
    and its default k-means start, which is random: the published path's timing uses a fresh
    start each fit, as the reference does; ``random_state`` (an int) seeds the stream of starts
    instead (``--agreement``'s yardstick)."""

    def __init__(self, random_state: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.starts = None if random_state is None else np.random.RandomState(random_state)

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        losses, _ = pseudo_label_loss(teacher_logits)
        chunks = losses.cpu().numpy().astype(np.float64).reshape(-1, chunk_size)
        keep = np.concatenate([self.keep_clean(chunk) for chunk in chunks])
        return torch.from_numpy(keep).to(teacher_logits.device)

    def keep_clean(self, losses: np.ndarray) -> np.ndarray:
        """Boolean keep mask of one chunk of per-sample losses (N,)."""
        span = losses.max() - losses.min()
        if span == 0:  # the reference yields NaN here; keep everything instead
            return np.ones(losses.shape[0], dtype=bool)
        normalised = ((losses - losses.min()) / span).reshape(-1, 1)
        mixture = GaussianMixture(
            n_components=2,
            max_iter=self.max_iter,
            tol=self.tol,
            reg_covar=self.reg_covar,
            random_state=self.starts,
        )
        with warnings.catch_warnings():  # the reference's 10-round cap stops some fits early
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit(normalised)
        clean = mixture.predict_proba(normalised)[:, mixture.means_.argmin()]
        return clean > self.threshold


class PublishedStyleScorer:
    """The reference implementation's scoring, for timing only (plugged into the synthesizer's
    ``scorer`` seam): a teacher forward of the whole test view for the pseudo-labels, then the
    logits again in chunks of 32, handed to the selection rule as one chunk (the published
    style scores one batch at a time)."""

    def __init__(self, teacher: torch.nn.Module, selection: Selection) -> None:
        self.teacher = teacher
        self.selection = selection

    @torch.no_grad()
    def __call__(self, test_view: torch.Tensor) -> torch.Tensor:
        # the reference's pseudo-label forward: the rule takes the arg-max of the same logits
        self.teacher(test_view)
        logits = torch.cat([self.teacher(chunk) for chunk in test_view.split(32)])
        return self.selection.keep_mask(logits, test_view.shape[0])
