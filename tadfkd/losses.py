"""Loss terms of data-free distillation, as pure functions of tensors.

Names and weights follow the TA-DFKD paper and its reference implementation; the baselines'
extra terms (class prior, activation, information entropy, attention transfer) follow their own
papers. Every function returns a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def student_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between logits (N, K): TA-DFKD's and DFAD's student loss."""
    return F.l1_loss(student_logits.float(), teacher_logits.float())


def student_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T), batch mean, times T^2 (Hinton's KD)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def jensen_shannon(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(logits / T), probabilities clamped to [0.01, 0.99].

    KL terms use batch-mean reduction, as in the reference implementation.
    """
    p = F.softmax(student_logits.float() / temperature, dim=1).clamp(0.01, 0.99)
    q = F.softmax(teacher_logits.float() / temperature, dim=1).clamp(0.01, 0.99)
    log_m = (0.5 * (p + q)).log()
    kl_pm = F.kl_div(log_m, p, reduction="batchmean")
    kl_qm = F.kl_div(log_m, q, reduction="batchmean")
    return 0.5 * (kl_pm + kl_qm)


def adversarial_js(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """1 - clamp(JS, 0, 1): minimising it drives the generator towards disagreement."""
    return 1.0 - jensen_shannon(student_logits, teacher_logits, temperature).clamp(0.0, 1.0)


def adversarial_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-L1(student, teacher) (DFAD): minimising it maximises the logit discrepancy."""
    return -student_l1(student_logits, teacher_logits)


def adversarial_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """-KL(teacher || student) (ZSKT's generator objective)."""
    return -student_kl(student_logits, teacher_logits, temperature)


def class_prior(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the teacher's logits against their own arg-max (DAFL's one-hot loss)."""
    logits = teacher_logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """Negative mean absolute penultimate activation of the teacher (DAFL)."""
    return -teacher_features.float().abs().mean()


def information_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy (nats) of the batch-mean teacher softmax (DAFL): balances classes."""
    mean_prob = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (mean_prob * mean_prob.clamp_min(1e-12).log()).sum()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Sum of the 2-norms of the right, down and diagonal neighbour differences of (B, C, H, W)."""
    x = images.float()
    right = x[..., :, :-1] - x[..., :, 1:]
    down = x[..., :-1, :] - x[..., 1:, :]
    diagonal = x[..., 1:, :-1] - x[..., :-1, 1:]
    anti_diagonal = x[..., :-1, :-1] - x[..., 1:, 1:]
    return right.norm() + down.norm() + diagonal.norm() + anti_diagonal.norm()


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """2-norm of the whole batch."""
    return images.float().norm()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention (Zagoruyko and Komodakis): L2-normalised mean over channels of a^2."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
) -> torch.Tensor:
    """Sum over matched layers of the mean squared difference of attention maps (ZSKT)."""
    return sum(
        (attention_map(s) - attention_map(t)).pow(2).mean()
        for s, t in zip(student_features, teacher_features, strict=True)
    )
