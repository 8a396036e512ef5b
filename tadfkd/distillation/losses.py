"""Loss terms of data-free distillation, as pure functions of tensors.

Names and weights follow the TA-DFKD paper and its reference implementation; the baselines'
extra terms (class prior, activation, information entropy, attention transfer) follow their own
public code. Every function returns a scalar tensor, computed in float32 from lower-precision
(autocast) inputs and in the inputs' own precision from float32 or float64 ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a narrower float type, else unchanged (float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def student_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between logits (N, K): TA-DFKD's and DFAD's student loss."""
    return F.l1_loss(wide(student_logits), wide(teacher_logits))


def student_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T), batch mean, times T^2 (Hinton's KD; the
    reduction of DAFL's ``kdloss`` and the CMI benchmark's ``KLDiv``)."""
    log_s = F.log_softmax(wide(student_logits) / temperature, dim=1)
    log_t = F.log_softmax(wide(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def student_kl_element_mean(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T) averaged over all N x K entries, without
    T^2: ZSKT's ``F.kl_div`` with its default reduction (K times smaller than ``student_kl``)."""
    log_s = F.log_softmax(wide(student_logits) / temperature, dim=1)
    log_t = F.log_softmax(wide(teacher_logits) / temperature, dim=1)
    return element_mean_kl(log_t.exp(), log_s)


def element_mean_kl(target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """sum(target * (log target - log_input)) / (N * K): ``nn.KLDivLoss()`` with its default
    ``reduction='mean'``, which averages over every entry of (N, K), not over the batch.

    Written out because PyTorch warns that ``'mean'`` will change meaning; ``target`` must be
    positive (every caller clamps it).
    """
    return (target * (target.log() - log_input)).mean()


def jensen_shannon(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """The published code's "JS divergence" of softmax(logits / T) (N, K), which is not the
    textbook one: M = (P + Q) / 2 from the unclamped softmaxes; then P, Q and M are each clamped
    to [0.01, 0.99]; D = (KL(M || P) + KL(M || Q)) / 2, each KL averaged over all N x K entries
    (``element_mean_kl``). The clamped values are no distributions, so D may be negative.
    """
    p = F.softmax(wide(student_logits) / temperature, dim=1)
    q = F.softmax(wide(teacher_logits) / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * element_mean_kl(m, p.log()) + 0.5 * element_mean_kl(m, q.log())


def adversarial_js(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """1 - clamp(D, 0, 1) of ``jensen_shannon``: minimising it drives the generator towards
    disagreement; where D clamps (D < 0, seen with 100+ classes) it gives no gradient."""
    return 1.0 - jensen_shannon(student_logits, teacher_logits, temperature).clamp(0.0, 1.0)


def adversarial_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-L1(student, teacher) (DFAD): minimising it maximises the logit discrepancy."""
    return -student_l1(student_logits, teacher_logits)


def adversarial_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """-``student_kl`` (the CMI benchmark's DFQ generator term)."""
    return -student_kl(student_logits, teacher_logits, temperature)


def adversarial_kl_element_mean(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """-``student_kl_element_mean`` (ZSKT's generator objective)."""
    return -student_kl_element_mean(student_logits, teacher_logits, temperature)


def class_prior(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the teacher's logits against their own arg-max (DAFL's one-hot loss)."""
    logits = wide(teacher_logits)
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """Negative mean absolute penultimate activation of the teacher (DAFL)."""
    return -wide(teacher_features).abs().mean()


def class_balance(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy, in nats, of the batch-mean teacher softmax: minimising it spreads the
    generated samples over the classes (the CMI benchmark's ``balance`` term)."""
    mean_prob = F.softmax(wide(teacher_logits), dim=1).mean(dim=0)
    # the published log(p) exactly, except that an underflowed p = 0 adds 0 instead of NaN
    return (mean_prob * mean_prob.clamp_min(torch.finfo(mean_prob.dtype).tiny).log()).sum()


def information_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``class_balance`` in base-10 logarithms (decimal digits, not nats), as DAFL's code
    computes its information-entropy loss: ln(10) times smaller."""
    return class_balance(teacher_logits) / math.log(10.0)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Sum of the 2-norms of the right, down and diagonal neighbour differences of (B, C, H, W)."""
    x = wide(images)
    right = x[..., :, :-1] - x[..., :, 1:]
    down = x[..., :-1, :] - x[..., 1:, :]
    diagonal = x[..., 1:, :-1] - x[..., :-1, 1:]
    anti_diagonal = x[..., :-1, :-1] - x[..., 1:, 1:]
    return right.norm() + down.norm() + diagonal.norm() + anti_diagonal.norm()


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """2-norm of the whole batch."""
    return wide(images).norm()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention (Zagoruyko and Komodakis): L2-normalised mean over channels of a^2."""
    return F.normalize(wide(features).pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
) -> torch.Tensor:
    """Sum over matched layers of the mean squared difference of attention maps (ZSKT)."""
    return sum(
        (attention_map(s) - attention_map(t)).pow(2).mean()
        for s, t in zip(student_features, teacher_features, strict=True)
    )
