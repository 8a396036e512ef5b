"""Datasets in the IDX format of MNIST, Fashion-MNIST and KMNIST: four files, each gzipped or not,
holding the training and test images (uint8, N x H x W, grayscale) and their labels (uint8, N).

``conf/dataset/<name>.yaml`` says which files, where they are looked for, the image size and the
class count the files must fit, and optionally how torchvision downloads them. Files are checked
by content (magic numbers, dimensions, length, label range), not by the md5 of one compression:
Debian's copies are recompressed.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tadfkd.base.errors import DatasetMissing, UserError
from tadfkd.data.loading import InMemoryImages

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: uint8 data, 3 resp. 1 dimensions


def find_idx(folder: Path, stem: str) -> Path | None:
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


class IDXSource:
    """One IDX dataset, as ``conf/dataset/<name>.yaml`` describes it.

    ``folders`` are searched in order for a split's (images, labels) files, ``train_files`` or
    ``test_files`` (names without ``.gz``). ``image_size`` and ``num_classes`` are what the files
    must hold. ``downloader`` (optional) is called without arguments to fetch the files into
    one of ``folders`` (torchvision's class of the dataset, ``_partial_`` in the YAML).
    ``how_to_get`` ends the message when the files are missing or damaged ("install them
    with ..."). Items are uint8 (1, H, W) images and their labels.
    """

    def __init__(
        self,
        title: str,
        folders: Sequence[str],
        train_files: Sequence[str],
        test_files: Sequence[str],
        image_size: int,
        num_classes: int,
        how_to_get: str,
        downloader: Callable[[], object] | None = None,
    ) -> None:
        self.title = title
        self.folders = [Path(folder).expanduser() for folder in folders]
        self.files = {True: tuple(train_files), False: tuple(test_files)}
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.how_to_get = how_to_get
        self.downloader = downloader

    def read(
        self, train: bool, download: bool, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> InMemoryImages:
        """The training or test split, downloaded first when missing and ``download`` allows."""
        paths = self._find(train) or self._download(train, download)
        images, labels = self._load(*paths)
        return InMemoryImages(images, labels, transform)

    def _find(self, train: bool) -> tuple[Path, Path] | None:
        """The split's (images, labels) files in the first folder that holds both."""
        image_stem, label_stem = self.files[train]
        for folder in self.folders:
            images, labels = find_idx(folder, image_stem), find_idx(folder, label_stem)
            if images and labels:
                return images, labels
        return None

    def _download(self, train: bool, download: bool) -> tuple[Path, Path]:
        """Fetch the files with the dataset's downloader and find them, or say how to get them."""
        looked = f"{self.title} not found (looked in {', '.join(map(str, self.folders))})"
        if self.downloader is None:
            raise DatasetMissing(f"{looked}; {self.how_to_get}.")
        if not download:
            raise DatasetMissing(f"{looked} and runtime.download=false; {self.how_to_get}.")
        try:
            self.downloader()
        except (OSError, RuntimeError) as error:
            raise DatasetMissing(
                f"{looked} and could not be downloaded ({type(error).__name__}; no network?); "
                f"{self.how_to_get}."
            ) from error
        paths = self._find(train)
        if paths is None:
            raise DatasetMissing(
                f"{looked} after its download, which wrote no {' and '.join(self.files[train])}; "
                f"{self.how_to_get}."
            )
        return paths

    def _load(self, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (N, 1, H, W) and labels int64 (N,), checked against the YAML."""
        size, num_classes = self.image_size, self.num_classes
        try:
            images = read_idx(images_path, IDX_IMAGES)
            labels = read_idx(labels_path, IDX_LABELS).astype(np.int64)
            if images.shape[1:] != (size, size):
                raise ValueError(f"images are {images.shape[1:]}, not {size}x{size}")
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
            if labels.size and labels.max() >= num_classes:
                raise ValueError(f"labels outside 0..{num_classes - 1} (up to {labels.max()})")
        except ValueError as error:
            fetch = " (or run with runtime.download=true on a machine with network access)"
            raise UserError(
                f"{self.title} file {images_path} or {labels_path} is not valid ({error}); "
                f"delete it, then {self.how_to_get}{fetch if self.downloader else ''}."
            ) from error
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)
