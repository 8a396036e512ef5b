"""Measuring a network: test-set accuracy, and the data-free health signals of a distillation
run (computed on generated samples only)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tadfkd.base import schema
from tadfkd.distillation.precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        correct += (model(images).argmax(dim=1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    return float(correct) / max(total, 1)


@torch.no_grad()
def health_signals(
    teacher: nn.Module, student: nn.Module, test_view: torch.Tensor, precision: Precision
) -> dict[str, float]:
    """Data-free health signals on the test view of a fresh generated batch (fractions).

    ``teacher_class_entropy``: entropy of the teacher's arg-max class histogram as a fraction of
    its maximum log(K); ``teacher_confidence``: mean max softmax probability; ``agreement``:
    fraction of samples where student (in eval mode) and teacher arg-max agree.
    """
    student.eval()
    try:
        with precision.autocast():
            teacher_logits = teacher(test_view).float()
            student_logits = student(test_view).float()
    finally:
        student.train()
    num_classes = teacher_logits.shape[1]
    predicted = teacher_logits.argmax(dim=1)
    histogram = torch.bincount(predicted, minlength=num_classes).float()
    p = histogram / histogram.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(num_classes)
    return {
        schema.TEACHER_CLASS_ENTROPY: float(entropy),
        schema.TEACHER_CONFIDENCE: float(F.softmax(teacher_logits, 1).amax(1).mean()),
        schema.AGREEMENT: float((student_logits.argmax(1) == predicted).float().mean()),
    }
