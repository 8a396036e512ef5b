"""Labelled image datasets as (normalised image, label) pairs, read through a dataset's source.

Every split yields ``(image, label)``: ``image`` a float32 tensor (C, H, W), normalised per
channel with the caller's (the teacher's) mean and std as ``(pixel / 255 - mean) / std``;
``label`` an int class index.

A source is what the ``source`` node of ``conf/dataset/<name>.yaml`` builds (its ``_target_``):
a reader of one file format, told by the YAML where the files are, what they hold and how to
get them. The formats: the IDX files of MNIST-like datasets (``tadfkd.data.idx``), CIFAR's
pickle batches (``tadfkd.data.cifar``), class folders of images such as Tiny-ImageNet's
(``tadfkd.data.folders``) and scikit-learn's embedded digits (``tadfkd.data.digits``). A new
dataset in one of these formats is one YAML file.

Training augmentation (teacher training only) is an ``Augmentation`` given by the caller; each
dataset's own (crop padding, flip) is ``augmentation`` in ``conf/dataset/<name>.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tadfkd.base.errors import UserError


@dataclass(frozen=True)
class Augmentation:
    """Random augmentation of real training images (teacher training only): a crop of the
    original size from the image zero-padded by ``crop_padding`` pixels, a horizontal flip with
    probability 0.5 when ``flip``, and with probability ``erase`` one random rectangle (2-33% of
    the image, aspect ratio 0.3-3.3) set to 0 after normalisation (random erasing)."""

    crop_padding: int = 0
    flip: bool = False
    erase: float = 0.0


class ImageTransform:
    """One image (C, H, W), uint8 in [0, 255] or float in [0, 1], to a normalised float32 image,
    augmented by ``augmentation`` first (crop, flip) and last (erasing) when one is given.

    Randomness comes from torch's global generator (seeded per worker by the DataLoader).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: Augmentation | None = None,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augmentation = augmentation or Augmentation()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        augmentation = self.augmentation
        if augmentation.crop_padding:
            image = _random_crop(image, augmentation.crop_padding)
        if augmentation.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        pixels = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        # out of place: for float images .float() is the stored tensor itself
        normalised = (pixels - self.mean) / self.std
        if augmentation.erase and torch.rand(()) < augmentation.erase:
            normalised = _erase_rectangle(normalised)
        return normalised


def _random_crop(image: torch.Tensor, padding: int) -> torch.Tensor:
    """Random (H, W) window of ``image`` (C, H, W) zero-padded by ``padding`` on every side."""
    height, width = image.shape[-2:]
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    padded = F.pad(image, (padding, padding, padding, padding))
    return padded[:, top : top + height, left : left + width]


def _erase_rectangle(image: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W) with one random rectangle of 2-33% of its area set to 0 (random
    erasing, Zhong et al. 2020, with torchvision's default ranges); up to 10 draws for a
    rectangle that fits, else unchanged."""
    height, width = image.shape[-2:]
    for _ in range(10):
        area = height * width * float(torch.empty(()).uniform_(0.02, 0.33))
        log_ratio = torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3))
        ratio = math.exp(float(log_ratio))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            erased = image.clone()
            erased[:, top : top + h, left : left + w] = 0
            return erased
    return image


class InMemoryImages(Dataset):
    """Images kept as one tensor (N, C, H, W) with labels (N,); ``transform`` runs per item.

    Pixels stay uint8 where the files hold them (a quarter of float32 memory); the digits are
    float in [0, 1].
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        """Channels per image."""
        return self.images.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class LabelledImages(Protocol):
    """A split as a source reads it: a dataset of (normalised image, label) with its channels."""

    channels: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class Source(Protocol):
    """A reader of one dataset, built from the ``source`` node of ``conf/dataset/<name>.yaml``.

    ``title`` names the dataset in messages; ``read`` returns the training split when ``train``
    and the test split otherwise, each image passed through ``transform`` as it is read, and may
    fetch missing files only when ``download`` is true.
    """

    title: str

    def read(
        self, train: bool, download: bool, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> LabelledImages: ...


def load_split(
    source: Source,
    split: str,
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: Augmentation | None = None,
    download: bool = True,
) -> LabelledImages:
    """The ``split`` ("train" or "test") of the dataset ``source`` reads (the object the
    ``source`` node of ``conf/dataset/<name>.yaml`` builds).

    Items are (image float32 (C, H, W) normalised with ``mean``/``std``, int label). ``mean``
    and ``std`` are per channel, in units of [0, 1] pixel intensity. ``augmentation`` (teacher
    training) augments each image as it is read. ``download`` lets a source that can fetch its
    files (as its YAML says) do so when they are missing.
    """
    if split not in ("train", "test"):
        raise UserError(
            f"Unknown split '{split}' for dataset {source.title}; use 'train' or 'test'."
        )
    transform = ImageTransform(mean, std, augmentation)
    dataset = source.read(split == "train", download, transform)
    if len(mean) != dataset.channels or len(std) != dataset.channels:
        raise UserError(
            f"Normalisation mean {list(mean)} / std {list(std)} must have one value per channel "
            f"of {source.title} ({dataset.channels}); set the teacher's mean and std accordingly."
        )
    return dataset


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """Batches of (images float32 (B, C, H, W), labels int64 (B,)).

    The shuffling order, and the augmentation seeds of worker processes, come from a generator
    seeded with ``seed``: the same seed gives the same batches. With ``num_workers=0``
    augmentation draws from torch's global generator instead.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        # workers live across epochs instead of being forked again for each
        persistent_workers=num_workers > 0,
    )
