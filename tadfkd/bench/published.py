"""The benchmark's published-style path: the settings and the selection of the reference
implementation, for timing only. Its scoring forward recomputes the teacher's logits in chunks
of 32, and its selection rule (named by ``selection._target_``, as any rule is) fits
scikit-learn's mixture on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from tadfkd.distillation.selection import GMMSelection, Selection, pseudo_label_loss

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
]


class ScikitLearnGMMSelection(GMMSelection):
    """The reference implementation's mixture, for timing only: scikit-learn's
    ``GaussianMixture`` fitted on the CPU to each chunk's min-max normalised pseudo-label loss,
    with ``GMMSelection``'s settings."""

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
            n_components=2, max_iter=self.max_iter, tol=self.tol, reg_covar=self.reg_covar
        )
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
