"""Clean-sample selection: the teacher as a lenient expert.

The published implementation fits scikit-learn's ``GaussianMixture(n_components=2, max_iter=10,
tol=1e-2, reg_covar=5e-4)`` to the teacher's min-max normalised per-sample loss, on the CPU, one
batch at a time. ``fit_two_gaussians`` is the same expectation-maximisation, also on the host in
float64, written for one dimension and two components: whole-array numpy operations on the batch
and plain floats for the six parameters, so that a batch of 64 costs some thirty small operations
a round rather than a general mixture's bookkeeping. It stops at ``tol`` as scikit-learn does.
Scored batches are fitted one by one (``clean_posterior``); on a GPU their losses come to the
host once a round, where the refill reads its kept counts anyway. With ``speed.mixture_kernel``
the same fit runs in C (``cpu_kernels.c``: the same float64 operations in the same order, sums
as numpy's pairwise sum, exp and log the C library's), a fraction of the time numpy's small
operations take on a batch of 64; the posteriors equal numpy's to float64 rounding (bit for bit
in the tests).

Two documented differences from scikit-learn, both tested for agreement
(``tests/test_selection.py``): the k-means initialisation uses the exact optimal 1-D split (by
sorting) instead of k-means++ plus Lloyd iterations, and a chunk whose losses are all equal
(scikit-learn's fit divides by zero there and the reference yields NaN) keeps every sample,
since all of them sit at the clean end of the normalised range.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tadfkd.base.errors import UserError
from tadfkd.models import kernels

_LOG_2PI = math.log(2.0 * math.pi)
# scikit-learn adds 10 * float64 epsilon to the component masses to avoid empty components.
_MASS_EPS = 10.0 * float(np.finfo(np.float64).eps)

# (weights, means, variances) of the two components, each a pair of floats
Mixture = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


def pseudo_label_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy of ``logits`` (N, K) against their own arg-max.

    Returns ``(loss, pseudo_labels)``, both of shape (N,); the loss is -log max softmax, in nats,
    computed in float32 whatever the dtype of the logits.
    """
    logits = logits.float()
    labels = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels, reduction="none"), labels


def minmax_normalise(losses: np.ndarray) -> np.ndarray:
    """``losses`` (N,) scaled to [0, 1]; constant losses (or any NaN) become all zeros."""
    low = losses.min()
    span = losses.max() - low
    # No spread to normalise: every sample is at the clean (minimum) end.
    return (losses - low) / span if span > 0 else np.zeros_like(losses)


def _two_means_split(x: np.ndarray) -> np.ndarray:
    """Hard assignment (N,) to the upper (true) side of the optimal 1-D 2-means split of ``x``."""
    ordered = np.sort(x)
    csum, csum_sq = np.cumsum(ordered), np.cumsum(ordered * ordered)
    left = np.arange(1, x.shape[0], dtype=x.dtype)  # size of the lower cluster
    s_left, q_left = csum[:-1], csum_sq[:-1]
    sse = (q_left - s_left**2 / left) + (
        (csum_sq[-1] - q_left) - (csum[-1] - s_left) ** 2 / (x.shape[0] - left)
    )
    # The split after the best prefix; ties between equal values all fall on the lower side.
    return x > ordered[sse.argmin()]


def _m_step(x: np.ndarray, resp: tuple[np.ndarray, np.ndarray], reg_covar: float) -> Mixture:
    """Weights, means and variances of the two components from responsibilities (N,) each."""
    # element-wise products and sums, not BLAS dot products: a BLAS call wakes its thread pool
    masses = [float(r.sum()) + _MASS_EPS for r in resp]
    means = [float((r * x).sum()) / mass for r, mass in zip(resp, masses, strict=True)]
    variances = [
        float((r * (x - mean) ** 2).sum()) / mass + reg_covar
        for r, mean, mass in zip(resp, means, masses, strict=True)
    ]
    total = masses[0] + masses[1]
    return (masses[0] / total, masses[1] / total), (means[0], means[1]), tuple(variances)


def _e_step(x: np.ndarray, mixture: Mixture) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean log-likelihood of ``x`` (N,) and the log responsibilities (N,) of each component."""
    joint = [
        -0.5 * (_LOG_2PI + math.log(var) + (x - mean) ** 2 / var) + math.log(weight)
        for weight, mean, var in zip(*mixture, strict=True)
    ]
    top = np.maximum(joint[0], joint[1])
    norm = top + np.log(np.exp(joint[0] - top) + np.exp(joint[1] - top))
    return float(norm.mean()), joint[0] - norm, joint[1] - norm


def fit_two_gaussians(
    values: np.ndarray, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4
) -> np.ndarray:
    """Posterior (N,) of the lower-mean component of a 2-Gaussian mixture fitted to ``values``
    (N,), float64: started from the optimal 2-means split, stopped once the mean log-likelihood
    changes by less than ``tol`` or after ``max_iter`` rounds, as scikit-learn's fit."""
    values = np.asarray(values, dtype=np.float64)
    upper = _two_means_split(values).astype(np.float64)
    mixture = _m_step(values, (1.0 - upper, upper), reg_covar)
    lower_bound = -math.inf
    for _ in range(max_iter):
        bound, *log_resp = _e_step(values, mixture)
        mixture = _m_step(values, (np.exp(log_resp[0]), np.exp(log_resp[1])), reg_covar)
        if abs(bound - lower_bound) < tol:
            break
        lower_bound = bound
    _, *log_resp = _e_step(values, mixture)
    means = mixture[1]
    return np.exp(log_resp[0] if means[0] <= means[1] else log_resp[1])


def clean_posterior(
    losses: torch.Tensor,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    by_kernel: bool = False,
) -> torch.Tensor:
    """Posterior probability (C, N), float32 on the device of ``losses``, that each sample
    belongs to the clean (low-loss) component.

    ``losses`` (C, N) are per-sample teacher losses, one mixture per row, fitted on the host
    (``by_kernel``: in C, where the kernels build and N >= 2). Rows whose losses are all equal
    get probability 1 for every sample (see the module docstring), as do rows with a NaN loss
    (NaN images: the non-finite guard names them).
    """
    rows = losses.detach().to("cpu", torch.float64)
    if by_kernel and rows.shape[1] >= 2 and kernels.kernels() is not None:
        rows = rows.contiguous()
        posterior = torch.empty(rows.shape, dtype=torch.float32)
        kernels.run_kernel(
            "two_gaussian_posterior",
            rows.data_ptr(),
            *rows.shape,
            max_iter,
            tol,
            reg_covar,
            posterior.data_ptr(),
        )
        return posterior.to(losses.device)
    values = rows.numpy()
    fitted = np.ones(values.shape, dtype=np.float64)
    for index, row in enumerate(values):
        if row.max() > row.min():
            fitted[index] = fit_two_gaussians(minmax_normalise(row), max_iter, tol, reg_covar)
    return torch.from_numpy(fitted.astype(np.float32)).to(losses.device)


class Selection(Protocol):
    """What the synthesizer and the benchmark ask of a selection rule (``conf/selection/``,
    built by ``_target_``): a rule is any class with these members.

    ``enabled``: whether the synthesizer scores generated samples at all (false: every sample
    is kept, unscored, and the generator step uses the whole batch). ``max_batches``: generated
    batches allowed per student batch before the student trains on fewer samples.
    """

    enabled: bool
    max_batches: int

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Boolean mask (N,) of the samples to keep, from the teacher's logits (N, K) on the
        test views of N / ``chunk_size`` generated batches of ``chunk_size`` samples each."""
        ...


class GMMSelection:
    """Keep the samples the teacher rates as clean (TA-DFKD's lenient-expert filter).

    A sample is kept when its posterior under the low-loss component of a 2-Gaussian mixture,
    fitted per chunk of ``chunk_size`` samples to the teacher's normalised pseudo-label loss,
    exceeds ``threshold``. ``by_kernel`` (set by the builder from ``speed.mixture_kernel``):
    the fit in C (``clean_posterior``).
    """

    enabled = True
    by_kernel = False

    def __init__(
        self,
        threshold: float = 0.5,
        max_iter: int = 10,
        tol: float = 1e-2,
        reg_covar: float = 5e-4,
        max_batches: int = 32,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise UserError(f"selection.threshold={threshold} is outside (0, 1); pick e.g. 0.5.")
        if max_batches < 1:
            raise UserError(f"selection.max_batches={max_batches} must be at least 1.")
        if not reg_covar > 0:  # a variance of 0 has no log-likelihood
            raise UserError(f"selection.reg_covar={reg_covar} must be a positive number.")
        self.threshold = threshold
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_batches = max_batches

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Boolean mask (N,) of kept samples for logits (N, K), N a multiple of ``chunk_size``."""
        losses, _ = pseudo_label_loss(teacher_logits)
        posterior = clean_posterior(
            losses.view(-1, chunk_size), self.max_iter, self.tol, self.reg_covar, self.by_kernel
        )
        return (posterior > self.threshold).view(-1)


class NoSelection:
    """Keep every generated sample (the published ``basic`` ablation and the baselines)."""

    enabled = False
    max_batches = 1

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """All-true mask (N,)."""
        return torch.ones(teacher_logits.shape[0], dtype=torch.bool, device=teacher_logits.device)


def fill_order(keep: torch.Tensor, chunk_size: int, generator: torch.Generator | None = None):
    """Indices of the samples that fill one student batch, as the reference's refill loop does.

    ``keep`` (M * chunk_size,) marks kept samples of M consecutive generated batches. The
    reference concatenates every kept sample of batches 1..j-1 and a uniformly random subset of
    batch j's kept samples, so that exactly ``chunk_size`` are taken; this returns those indices
    (at most ``chunk_size`` of them: fewer when the M batches together kept fewer).
    """
    chunk = torch.arange(keep.numel(), device=keep.device) // chunk_size
    jitter = torch.rand(keep.numel(), device=keep.device, generator=generator)
    key = torch.where(keep, chunk.to(jitter.dtype) + jitter, torch.full_like(jitter, math.inf))
    taken = min(chunk_size, keep.numel())
    order = key.argsort()[:taken]
    return order[keep[order]]
