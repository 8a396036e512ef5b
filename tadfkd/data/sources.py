"""Labelled image datasets as (normalised image, label) pairs.

Every split yields ``(image, label)``: ``image`` a float32 tensor (C, H, W), normalised per
channel with the caller's (the teacher's) mean and std as ``(pixel / 255 - mean) / std``;
``label`` an int class index.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16),
  scaled to [0, 1] and upsampled to 16x16 (bilinear, ``align_corners=False``), one channel.
  Fixed split: ``train_test_split(indices, test_size=0.25, random_state=0,
  stratify=labels)`` over the bundled order, giving 1347 train and 450 test images. Needs no
  files and no network; ``root`` and ``download`` are ignored.
- ``cifar10`` / ``cifar100``: the official python-pickle batches in torchvision's layout,
  ``root/cifar-10-batches-py`` and ``root/cifar-100-python``, downloaded there when missing.
- ``fashion_mnist``: Fashion-MNIST's four official IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  gzipped or not), 28x28 grayscale, 60000 train and 10000 test images, looked for in
  ``root/FashionMNIST/raw`` (torchvision's layout), ``root/fashion-mnist``, ``root`` and
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package), else
  downloaded through torchvision into ``root/FashionMNIST/raw`` when ``download`` is on. Files
  are checked by content (magic numbers, dimensions, length, label range), not by the md5 of one
  compression: Debian's copies are recompressed.
- ``tinyimagenet``: the official archive extracted to ``root/tiny-imagenet-200``; its labelled
  validation set serves as the test split (the archive's test images carry no labels). The flat
  ``val/images`` folder is sorted into ``val/<wnid>/`` class folders on first use.

Training augmentation (teacher training only) is an ``Augmentation`` given by the caller; each
dataset's own (crop padding, flip) is ``augmentation`` in ``conf/dataset/<name>.yaml``.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms.v2.functional import pil_to_tensor

from tadfkd.base.errors import DatasetMissing, UserError


@dataclass(frozen=True)
class Augmentation:
    """Random augmentation of real training images (teacher training only): a crop of the
    original size from the image zero-padded by ``crop_padding`` pixels, a horizontal flip with
    probability 0.5 when ``flip``, and with probability ``erase`` one random rectangle (2-33% of
    the image, aspect ratio 0.3-3.3) set to 0 after normalisation (random erasing)."""

    crop_padding: int = 0
    flip: bool = False
    erase: float = 0.0


_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


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

    CIFAR stays uint8 (a quarter of float32 memory); digits are float in [0, 1].
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


def load_split(
    name: str,
    root: str,
    split: str,
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: Augmentation | None = None,
    download: bool = True,
) -> Dataset:
    """The ``split`` ("train" or "test") of dataset ``name`` stored under the folder ``root``.

    Items are (image float32 (C, H, W) normalised with ``mean``/``std``, int label). ``mean``
    and ``std`` are per channel, in units of [0, 1] pixel intensity. ``augmentation`` (teacher
    training) augments each image as it is read. ``download`` lets CIFAR and Fashion-MNIST be
    fetched when missing; digits need no files and Tiny-ImageNet is never downloaded.
    """
    if name not in LOADERS:
        raise UserError(f"Unknown dataset '{name}'; choose one of {', '.join(LOADERS)}.")
    if split not in ("train", "test"):
        raise UserError(f"Unknown split '{split}' for dataset {name}; use 'train' or 'test'.")
    transform = ImageTransform(mean, std, augmentation)
    dataset = LOADERS[name](Path(root).expanduser(), split == "train", download, transform)
    if len(mean) != dataset.channels or len(std) != dataset.channels:
        raise UserError(
            f"Normalisation mean {list(mean)} / std {list(std)} must have one value per channel "
            f"of {name} ({dataset.channels}); set the teacher's mean and std accordingly."
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


def _load_digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images float32 (N, 1, 16, 16) in [0, 1] and labels int64 (N,) of one split."""
    digits = load_digits()
    train_indices, test_indices = train_test_split(
        np.arange(len(digits.target)), test_size=0.25, random_state=0, stratify=digits.target
    )
    indices = train_indices if train else test_indices
    images = torch.from_numpy(digits.images[indices] / 16.0).float().unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return images, torch.from_numpy(digits.target[indices]).long()


@dataclass(frozen=True)
class _CifarSource:
    """Where a CIFAR variant lives; torchvision's class holds its folder, file and URL names."""

    title: str
    torchvision_class: type[CIFAR10]
    label_key: str
    num_classes: int


_CIFAR_SOURCES = {
    "cifar10": _CifarSource("CIFAR-10", CIFAR10, "labels", 10),
    "cifar100": _CifarSource("CIFAR-100", CIFAR100, "fine_labels", 100),
}


def _load_cifar(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR images uint8 (N, 3, 32, 32) and labels int64 (N,), read from the pickle batches.

    The batch files are read directly rather than through torchvision's class, whose md5 check
    would refuse any copy but the official one; the restricted unpickler keeps a foreign file
    from running code instead.
    """
    source = _CIFAR_SOURCES[name]
    tv = source.torchvision_class
    folder = root / tv.base_folder
    files = [folder / file_name for file_name, _md5 in (tv.train_list if train else tv.test_list)]
    if not all(path.is_file() for path in files):
        _download_cifar(source, root, download)
    batches = [_read_cifar_batch(path, source, source.num_classes) for path in files]
    images = np.concatenate([data for data, _labels in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _data, labels in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _download_cifar(source: _CifarSource, root: Path, download: bool) -> None:
    """Download and extract the official archive into ``root``, or say how to provide it."""
    tv = source.torchvision_class
    where = (
        f"put the extracted {tv.base_folder} folder (from {tv.url}) under {root}/ "
        "or set paths.data=/path"
    )
    if not download:
        raise DatasetMissing(
            f"{source.title} not found under {root}/ and runtime.download=false; {where}."
        )
    try:
        download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as error:
        raise DatasetMissing(
            f"{source.title} not found under {root}/ and could not be downloaded "
            f"({type(error).__name__}: {error}; no network?); {where}."
        ) from error


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds (dicts, lists, numpy arrays), never running code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # as written by the official (numpy 1) files
            ("numpy._core.multiarray", "_reconstruct"),  # as written by numpy 2
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(
    path: Path, source: _CifarSource, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images uint8 (N, 3072) in CHW order and labels int64 (N,)."""
    try:
        with path.open("rb") as file:
            # latin1 as torchvision: the official files are Python 2 pickles
            entry = _CifarUnpickler(file, encoding="latin1").load()
        return _check_cifar_batch(entry, source.label_key, num_classes)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UserError(
            f"{path} is not a {source.title} batch file ({error}); "
            f"re-extract {source.torchvision_class.url} under {path.parent.parent}/."
        ) from error


def _check_cifar_batch(
    entry: object, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (data, labels) of an unpickled batch, or a ValueError saying what is wrong."""
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise ValueError(f"expected a dict with 'data' and '{label_key}'")
    data = entry["data"]
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
        raise ValueError("'data' is not a uint8 N x 3072 array")
    if labels.shape != (len(data),):
        raise ValueError(f"{len(data)} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return data, labels


# -- Fashion-MNIST: the official IDX files ------------------------------------------------------
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: uint8 data, 3 resp. 1 dimensions
_FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fashion_mnist_folders(root: Path) -> list[Path]:
    """Where the IDX files are looked for, in order."""
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, FASHION_MNIST_SYSTEM_DIR]


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (the plain file first)."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file (gzipped when its name ends in ``.gz``); a ``ValueError``
    says what is wrong when the header's magic number or dimensions do not fit the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"cannot be read ({type(error).__name__}: {error})") from error
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"does not start with the IDX magic number {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"holds {len(data) - header} bytes of data, not the {shape} its header says"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_fashion_mnist(
    root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images uint8 (N, 1, 28, 28) and labels int64 (N,) of one split."""
    image_stem, label_stem = _FASHION_MNIST_FILES[train]
    for folder in fashion_mnist_folders(root):
        images_path, labels_path = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
        if images_path and labels_path:
            break
    else:
        images_path, labels_path = _download_fashion_mnist(root, image_stem, label_stem, download)
    try:
        images = read_idx(images_path, _IDX_IMAGES)
        labels = read_idx(labels_path, _IDX_LABELS).astype(np.int64)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"images are {images.shape[1:]}, not 28x28")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"labels outside 0..9 (up to {labels.max()})")
    except ValueError as error:
        raise UserError(
            f"Fashion-MNIST file {images_path} or {labels_path} is not valid ({error}); "
            "replace it with the official file (apt-get install dataset-fashion-mnist, or "
            "delete it and run with runtime.download=true on a machine with network access)."
        ) from error
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)


def _download_fashion_mnist(
    root: Path, image_stem: str, label_stem: str, download: bool
) -> tuple[Path, Path]:
    """Download the four files through torchvision into ``root/FashionMNIST/raw``, or say how
    to get them."""
    where = (
        "install them with `make data` (Debian's dataset-fashion-mnist package, into "
        f"{FASHION_MNIST_SYSTEM_DIR}) or put the four official IDX files in "
        f"{root / 'FashionMNIST' / 'raw'}"
    )
    looked = ", ".join(str(folder) for folder in fashion_mnist_folders(root))
    if not download:
        raise DatasetMissing(
            f"Fashion-MNIST not found (looked in {looked}) and runtime.download=false; {where}."
        )
    try:
        FashionMNIST(str(root), download=True)
    except (OSError, RuntimeError) as error:
        raise DatasetMissing(
            f"Fashion-MNIST not found (looked in {looked}) and could not be downloaded "
            f"({type(error).__name__}; no network?); {where}."
        ) from error
    raw = root / "FashionMNIST" / "raw"
    return _find_idx(raw, image_stem), _find_idx(raw, label_stem)


def _load_tiny_imagenet(
    root: Path, train: bool, transform: Callable[[torch.Tensor], torch.Tensor]
) -> ImageFolder:
    """Tiny-ImageNet train split, or the labelled validation set as the test split."""
    folder = root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file():
        raise DatasetMissing(
            f"Tiny-ImageNet not found under {root}/; extract {_TINY_IMAGENET_URL} there "
            f"(so that {folder}/wnids.txt exists) or set paths.data=/path."
        )
    wnids = sorted((folder / "wnids.txt").read_text().split())
    if not train:
        _sort_validation_images(folder / "val")
    try:
        return _WnidImageFolder(folder / ("train" if train else "val"), wnids, transform)
    except FileNotFoundError as error:
        raise UserError(
            f"Tiny-ImageNet under {folder} is incomplete ({error}); "
            f"re-extract {_TINY_IMAGENET_URL} there."
        ) from error


def _sort_validation_images(val: Path) -> None:
    """Move ``val/images/<file>`` to ``val/<wnid>/<file>`` as ``val_annotations.txt`` lists.

    Each move is an atomic rename, so an interrupted run leaves every image in exactly one of
    the two places and the next call finishes the job; ``val/images`` is removed last, and its
    absence marks the sort as done.
    """
    flat = val / "images"
    if not flat.is_dir():
        return
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(
            f"{annotations} is missing, so the validation images cannot be sorted into "
            f"classes; re-extract {_TINY_IMAGENET_URL}."
        )
    for line in annotations.read_text().splitlines():
        file_name, wnid = line.split("\t")[:2]
        target = val / wnid / file_name
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(flat / file_name, target)
        except FileNotFoundError:
            # already moved by an earlier, interrupted run (or by a concurrent one)
            if not target.is_file():
                raise UserError(
                    f"Validation image {file_name} listed in {annotations} is in neither "
                    f"{flat} nor {target.parent}; re-extract {_TINY_IMAGENET_URL}."
                ) from None
    # stays if it holds files the annotations do not list, or a concurrent run removed it
    with suppress(OSError):
        flat.rmdir()


def _read_rgb(path: str) -> torch.Tensor:
    """Image file as uint8 (3, H, W); some Tiny-ImageNet JPEGs are grayscale."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


class _WnidImageFolder(ImageFolder):
    """ImageFolder whose classes are the given wnids in sorted order, not the folders found.

    A stray folder (such as a leftover ``val/images``) thus never becomes a class.
    """

    channels = 3  # every image is read as RGB

    def __init__(
        self,
        directory: Path,
        wnids: list[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.wnids = wnids
        super().__init__(str(directory), transform=transform, loader=_read_rgb)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self.wnids, {wnid: index for index, wnid in enumerate(self.wnids)}


def _digits(_root: Path, train: bool, _download: bool, transform: ImageTransform) -> Dataset:
    return InMemoryImages(*_load_digits(train), transform)


def _fashion_mnist(root: Path, train: bool, download: bool, transform: ImageTransform) -> Dataset:
    return InMemoryImages(*_load_fashion_mnist(root, train, download), transform)


def _cifar(name: str) -> Callable[[Path, bool, bool, ImageTransform], Dataset]:
    def load(root: Path, train: bool, download: bool, transform: ImageTransform) -> Dataset:
        return InMemoryImages(*_load_cifar(name, root, train, download), transform)

    return load


def _tiny_imagenet(root: Path, train: bool, _download: bool, transform: ImageTransform) -> Dataset:
    return _load_tiny_imagenet(root, train, transform)


# dataset name -> reader (root, train split?, download allowed?, transform) -> dataset; what a
# dataset is (classes, image size, channels, augmentation) lives in conf/dataset/<name>.yaml
LOADERS: dict[str, Callable[[Path, bool, bool, ImageTransform], Dataset]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "tinyimagenet": _tiny_imagenet,
}
