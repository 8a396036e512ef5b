"""Clean-sample selection: the teacher as a lenient expert.

The published implementation fits scikit-learn's ``GaussianMixture(n_components=2, max_iter=10,
tol=1e-2, reg_covar=5e-4)`` to the teacher's min-max normalised per-sample loss, on the CPU, one
batch at a time. ``fit_two_gaussians`` is the same expectation-maximisation in torch, on the
device of the losses, vectorised over independent chunks (one mixture per batch-sized chunk): the
early stop at ``tol`` is applied per chunk by freezing the parameters of converged chunks. On a
GPU the loop runs all ``max_iter`` rounds, free of host synchronisation; on the CPU, where reading
a flag costs nothing, it leaves once every chunk has converged, as scikit-learn does (frozen
parameters would not change in the remaining rounds, so the result is the same).

Two documented differences from scikit-learn, both tested for agreement
(``tests/test_selection.py``): the k-means initialisation uses the exact optimal 1-D split (by
sorting) instead of k-means++ plus Lloyd iterations, and a chunk whose losses are all equal
(scikit-learn's fit divides by zero there and the reference yields NaN) keeps every sample,
since all of them sit at the clean end of the normalised range.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from tadfkd.base.errors import UserError

_LOG_2PI = math.log(2.0 * math.pi)
# scikit-learn adds 10 * float64 epsilon to the component masses to avoid empty components.
_MASS_EPS = 10.0 * torch.finfo(torch.float64).eps


def pseudo_label_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy of ``logits`` (N, K) against their own arg-max.

    Returns ``(loss, pseudo_labels)``, both of shape (N,); the loss is -log max softmax, in nats,
    computed in float32 whatever the dtype of the logits.
    """
    logits = logits.float()
    labels = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels, reduction="none"), labels


def minmax_normalise(losses: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``losses`` (C, N) to [0, 1]; a constant row becomes all zeros."""
    low = losses.amin(dim=1, keepdim=True)
    span = losses.amax(dim=1, keepdim=True) - low
    # A constant row has no spread to normalise: every sample is at the clean (minimum) end.
    return torch.where(span > 0, (losses - low) / span.clamp_min(1e-30), torch.zeros_like(losses))


def _two_means_split(x: torch.Tensor) -> torch.Tensor:
    """Hard assignment (C, N) to the lower (0) or upper (1) of the optimal 1-D 2-means split."""
    sorted_x, _ = x.sort(dim=1)
    n = x.shape[1]
    csum = sorted_x.cumsum(dim=1)
    csum_sq = (sorted_x * sorted_x).cumsum(dim=1)
    left = torch.arange(1, n, device=x.device, dtype=x.dtype)  # size of the lower cluster
    right = n - left
    s_left, q_left = csum[:, :-1], csum_sq[:, :-1]
    s_right, q_right = csum[:, -1:] - s_left, csum_sq[:, -1:] - q_left
    sse = (q_left - s_left**2 / left) + (q_right - s_right**2 / right)
    # The split after the best prefix; ties between equal values all fall on the lower side.
    best = sse.argmin(dim=1, keepdim=True)
    threshold = sorted_x.gather(1, best)
    return (x > threshold).to(x.dtype)


def _log_gaussian(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, var) for x (C, N, 1) and mean, var (C, 1, 2): returns (C, N, 2)."""
    return -0.5 * (_LOG_2PI + var.log() + (x - mean) ** 2 / var)


def _m_step(
    x: torch.Tensor, resp: torch.Tensor, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and variances (each (C, 1, 2)) from responsibilities ``resp`` (C, N, 2)."""
    mass = resp.sum(dim=1, keepdim=True) + _MASS_EPS
    mean = (resp * x).sum(dim=1, keepdim=True) / mass
    var = (resp * (x - mean) ** 2).sum(dim=1, keepdim=True) / mass + reg_covar
    weight = mass / mass.sum(dim=2, keepdim=True)
    return weight, mean, var


def _e_step(
    x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-likelihood per chunk (C,) and log responsibilities (C, N, 2)."""
    joint = _log_gaussian(x, mean, var) + weight.log()
    norm = torch.logsumexp(joint, dim=2, keepdim=True)
    return norm.mean(dim=(1, 2)), joint - norm


def fit_two_gaussians(
    values: torch.Tensor,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    early_exit: bool | None = None,
) -> torch.Tensor:
    """Posterior of the lower-mean component of a 2-Gaussian mixture fitted to each row.

    ``values`` is (C, N): C independent chunks of N scalars each. Returns (C, N) probabilities in
    [0, 1], float32. The fit runs in float64 on the device of ``values``, as scikit-learn's does.
    ``early_exit`` (default: on the CPU only) leaves the loop once every chunk has converged.
    """
    x = values.double().unsqueeze(2)
    upper = _two_means_split(values.double()).unsqueeze(2)
    weight, mean, var = _m_step(x, torch.cat([1.0 - upper, upper], dim=2), reg_covar)
    active = torch.ones(x.shape[0], 1, 1, dtype=torch.bool, device=x.device)
    lower_bound = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    if early_exit is None:
        early_exit = x.device.type == "cpu"
    for _ in range(max_iter):
        new_bound, log_resp = _e_step(x, weight, mean, var)
        new_weight, new_mean, new_var = _m_step(x, log_resp.exp(), reg_covar)
        weight = torch.where(active, new_weight, weight)
        mean = torch.where(active, new_mean, mean)
        var = torch.where(active, new_var, var)
        converged = (new_bound - lower_bound).abs() < tol
        lower_bound = torch.where(active.view(-1), new_bound, lower_bound)
        active = active & ~converged.view(-1, 1, 1)
        if early_exit and not bool(active.any()):
            break
    _, log_resp = _e_step(x, weight, mean, var)
    clean = mean.argmin(dim=2, keepdim=True).expand(-1, x.shape[1], 1)
    return log_resp.gather(2, clean).squeeze(2).exp().float()


def clean_posterior(
    losses: torch.Tensor, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4
) -> torch.Tensor:
    """Posterior probability (C, N) that each sample belongs to the clean (low-loss) component.

    ``losses`` (C, N) are per-sample teacher losses, one mixture per row. Rows whose losses are
    all equal get probability 1 for every sample (see the module docstring).
    """
    normalised = minmax_normalise(losses.double())
    constant = (losses.amax(dim=1) == losses.amin(dim=1)).unsqueeze(1)
    posterior = fit_two_gaussians(normalised, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    return torch.where(constant, torch.ones_like(posterior), posterior)


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
    exceeds ``threshold``.
    """

    enabled = True

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
        self.threshold = threshold
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_batches = max_batches

    def keep_mask(self, teacher_logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Boolean mask (N,) of kept samples for logits (N, K), N a multiple of ``chunk_size``."""
        losses, _ = pseudo_label_loss(teacher_logits)
        posterior = clean_posterior(
            losses.view(-1, chunk_size), self.max_iter, self.tol, self.reg_covar
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
