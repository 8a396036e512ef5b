"""Datasets in CIFAR's format: python-pickle batches of uint8 (N, 3072) images in CHW order with
their labels, in one folder extracted from the official archive (torchvision's layout).

``conf/dataset/<name>.yaml`` says which folder and batch files, the labels' key, the class count
and the archive to download (CIFAR-10 and CIFAR-100 differ only there).
"""

from __future__ import annotations

import pickle
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torchvision.datasets.utils import download_and_extract_archive

from tadfkd.base.errors import DatasetMissing, UserError
from tadfkd.data.loading import InMemoryImages


class CifarUnpickler(pickle.Unpickler):
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


def check_batch(entry: object, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
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


class CifarSource:
    """One CIFAR-format dataset, as ``conf/dataset/<name>.yaml`` describes it.

    ``folder`` (under ``root``) holds the batch files ``train_files`` and ``test_files``; each
    batch's labels are under ``label_key``, classes ``0..num_classes - 1``. The archive at
    ``url`` (saved as ``filename``, checked against ``md5``) extracts ``folder`` into ``root``.
    ``how_to_get`` ends the message when the files are missing. Items are uint8 (3, 32, 32)
    images and their labels.

    The batch files are read directly rather than through torchvision's class, whose md5 check
    would refuse any copy but the official one; the restricted unpickler keeps a foreign file
    from running code instead.
    """

    def __init__(
        self,
        title: str,
        root: str,
        folder: str,
        train_files: Sequence[str],
        test_files: Sequence[str],
        label_key: str,
        num_classes: int,
        url: str,
        filename: str,
        md5: str,
        how_to_get: str,
    ) -> None:
        self.title = title
        self.root = Path(root).expanduser()
        self.folder = self.root / folder
        self.files = {True: tuple(train_files), False: tuple(test_files)}
        self.label_key = label_key
        self.num_classes = int(num_classes)
        self.archive = (url, filename, md5)
        self.how_to_get = how_to_get

    def read(
        self, train: bool, download: bool, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> InMemoryImages:
        """Images uint8 (N, 3, 32, 32) and labels of one split, downloaded first when a batch
        file is missing and ``download`` allows."""
        files = [self.folder / name for name in self.files[train]]
        if not all(path.is_file() for path in files):
            self._download(download)
        batches = [self._read_batch(path) for path in files]
        images = np.concatenate([data for data, _labels in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _data, labels in batches])
        return InMemoryImages(torch.from_numpy(images), torch.from_numpy(labels), transform)

    def _download(self, download: bool) -> None:
        """Download and extract the official archive into ``root``, or say how to provide it."""
        if not download:
            raise DatasetMissing(
                f"{self.title} not found under {self.root}/ and runtime.download=false; "
                f"{self.how_to_get}."
            )
        url, filename, md5 = self.archive
        try:
            download_and_extract_archive(url, str(self.root), filename=filename, md5=md5)
        except (OSError, RuntimeError, tarfile.TarError) as error:
            raise DatasetMissing(
                f"{self.title} not found under {self.root}/ and could not be downloaded "
                f"({type(error).__name__}: {error}; no network?); {self.how_to_get}."
            ) from error

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One batch file: images uint8 (N, 3072) in CHW order and labels int64 (N,)."""
        try:
            with path.open("rb") as file:
                # latin1 as torchvision: the official files are Python 2 pickles
                entry = CifarUnpickler(file, encoding="latin1").load()
            return check_batch(entry, self.label_key, self.num_classes)
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise UserError(
                f"{path} is not a {self.title} batch file ({error}); "
                f"re-extract {self.archive[0]} under {self.root}/."
            ) from error
