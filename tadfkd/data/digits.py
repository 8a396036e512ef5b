"""scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16): real data that
needs no files and no network."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tadfkd.data.loading import InMemoryImages

DIGITS_MAX = 16.0  # the bundled images' largest value


class DigitsSource:
    """The digits scaled to [0, 1] and upsampled to ``image_size`` (bilinear,
    ``align_corners=False``), one channel, split by ``train_test_split(indices,
    test_size=test_size, random_state=split_seed, stratify=labels)`` over the bundled order
    (0.25 and 0: 1347 train and 450 test images). Items are float (1, H, W) images in [0, 1]."""

    def __init__(self, title: str, image_size: int, test_size: float, split_seed: int) -> None:
        self.title = title
        self.image_size = int(image_size)
        self.test_size = float(test_size)
        self.split_seed = int(split_seed)

    def read(
        self, train: bool, download: bool, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> InMemoryImages:
        """The training or the test split (``download`` is ignored: nothing is fetched)."""
        digits = load_digits()
        train_indices, test_indices = train_test_split(
            np.arange(len(digits.target)),
            test_size=self.test_size,
            random_state=self.split_seed,
            stratify=digits.target,
        )
        indices = train_indices if train else test_indices
        images = torch.from_numpy(digits.images[indices] / DIGITS_MAX).float().unsqueeze(1)
        size = (self.image_size, self.image_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return InMemoryImages(images, torch.from_numpy(digits.target[indices]).long(), transform)
