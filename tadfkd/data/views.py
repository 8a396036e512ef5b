"""The two views of a generated batch: a train view (augmented) and a test view; and which of
them, in which modes, a method's networks are fed (``Inputs``).

As in the published code, augmentation is applied once to the whole batch tensor (the way
torchvision's transforms treat a 4-D tensor): one random crop offset and one flip decision per
batch, not per image. Both are plain indexing, so gradients reach the generator through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tadfkd.base.errors import UserError


class Views:
    """Turns generator output in [0, 1] (B, C, H, W) into normalised train and test views."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        self.mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = flip
        # the constants on each (device, dtype) seen, copied there once rather than every call
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Per-channel (x - mean) / std with the teacher's training constants."""
        key = (images.device, images.dtype)
        if key not in self._constants:
            self._constants[key] = (
                self.mean.to(device=images.device, dtype=images.dtype),
                self.std.to(device=images.device, dtype=images.dtype),
            )
        mean, std = self._constants[key]
        return (images - mean) / std

    def test_view(self, images: torch.Tensor) -> torch.Tensor:
        """Normalisation only."""
        return self.normalise(images)

    def train_view(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Random crop with zero padding, horizontal flip, then normalisation (one draw a batch)."""
        pad = self.crop_padding
        if pad > 0:
            height, width = images.shape[-2:]
            offsets = torch.randint(0, 2 * pad + 1, (2,), generator=generator)
            top, left = int(offsets[0]), int(offsets[1])
            padded = F.pad(images, (pad, pad, pad, pad))
            images = padded[..., top : top + height, left : left + width]
        if self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            images = images.flip(-1)
        return self.normalise(images)


MODES = ("train", "eval")


@dataclass(frozen=True)
class Inputs:
    """How a method's public code feeds generated images to its networks (``method.inputs``).

    ``augment``: the student steps and the generator step see the train view (crop and flip,
    then normalisation), as TA-DFKD's code does; false: the test view (normalisation only), the
    generator output as DAFL, DFAD, DFQ and ZSKT use it. ``sample_mode``: the generator's mode
    when it produces the student's batches (``eval``: its BatchNorm running statistics, as the
    CMI benchmark's DFQ samples). ``student_mode``: the student's mode during the generator
    step (``eval`` in the CMI benchmark's DFQ). ``noise``: ``fresh`` draws new noise for every
    student batch; ``generator_step`` makes the student batches of an iteration reuse the noise
    of the last generator step (ZSKT: one noise batch for a generator step and the student steps
    after it; refilled selection needs fresh noise, so only without selection).
    """

    augment: bool = True
    sample_mode: str = "train"
    student_mode: str = "train"
    noise: str = "fresh"

    def __post_init__(self) -> None:
        for key in ("sample_mode", "student_mode"):
            if getattr(self, key) not in MODES:
                raise UserError(
                    f"method.inputs.{key}={getattr(self, key)!r} is unknown; use train or eval."
                )
        if self.noise not in ("fresh", "generator_step"):
            raise UserError(
                f"method.inputs.noise={self.noise!r} is unknown; use fresh or generator_step."
            )
        if not isinstance(self.augment, bool):
            raise UserError(f"method.inputs.augment={self.augment!r} is not true or false.")
