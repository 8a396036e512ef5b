"""Tiny datasets written in the official on-disk formats, for tests that cannot download.

CIFAR batches are pickled dicts holding 'data' (uint8 N x 3072, CHW order) and the labels
('labels' for CIFAR-10, 'fine_labels' and 'coarse_labels' for CIFAR-100), as the official
files read with ``encoding="latin1"``. Tiny-ImageNet follows the official archive: JPEGs in
``train/<wnid>/images``, flat ``val/images`` with ``val/val_annotations.txt``, ``wnids.txt``.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as file:
        # protocol 2, as the official Python 2 files
        pickle.dump(obj, file, protocol=2)


def write_fake_cifar(
    root: str | Path,
    name: str = "cifar10",
    n_train: int = 20,
    n_test: int = 10,
    seed: int = 0,
) -> Path:
    """Write random CIFAR-10 or CIFAR-100 batches under ``root``; returns the dataset folder.

    CIFAR-10 spreads the training images over the five ``data_batch_*`` files as the official
    archive does. Images are uniform random uint8, labels uniform random classes.
    """
    rng = np.random.default_rng(seed)
    num_classes = {"cifar10": 10, "cifar100": 100}[name]

    def batch(n: int, batch_label: str) -> dict[str, object]:
        labels = rng.integers(0, num_classes, n).tolist()
        entry: dict[str, object] = {
            "batch_label": batch_label,
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"image_{i}.png" for i in range(n)],
        }
        if name == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"] = labels
            entry["coarse_labels"] = [label // 5 for label in labels]
        return entry

    if name == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for index, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump(folder / f"data_batch_{index}", batch(len(part), f"training batch {index} of 5"))
        _dump(folder / "test_batch", batch(n_test, "testing batch 1 of 1"))
        _dump(folder / "batches.meta", {"label_names": [f"class_{c}" for c in range(10)]})
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(folder / "train", batch(n_train, "training batch 1 of 1"))
        _dump(folder / "test", batch(n_test, "testing batch 1 of 1"))
        _dump(
            folder / "meta",
            {
                "fine_label_names": [f"fine_{c}" for c in range(100)],
                "coarse_label_names": [f"coarse_{c}" for c in range(20)],
            },
        )
    return folder


def write_fake_tinyimagenet(
    root: str | Path,
    n_classes: int = 3,
    n_train_per_class: int = 2,
    n_val_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Write a Tiny-ImageNet folder of random 64x64 JPEGs under ``root``; returns the folder.

    ``wnids.txt`` lists the classes in reverse-sorted order (class indices follow sorted order),
    and the first validation image is grayscale, as some official ones are.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{number:08d}" for number in sorted(rng.choice(10**8, n_classes, replace=False))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in reversed(wnids)))
    (folder / "words.txt").write_text("".join(f"{wnid}\tthing {wnid}\n" for wnid in wnids))

    def write_jpeg(path: Path, grayscale: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64) if grayscale else (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")

    for wnid in wnids:
        boxes = []
        for index in range(n_train_per_class):
            file_name = f"{wnid}_{index}.JPEG"
            write_jpeg(folder / "train" / wnid / "images" / file_name)
            boxes.append(f"{file_name}\t0\t0\t63\t63\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))

    annotations = []
    val_wnids = [wnid for wnid in wnids for _ in range(n_val_per_class)]
    for index, wnid in enumerate(rng.permutation(val_wnids)):
        file_name = f"val_{index}.JPEG"
        write_jpeg(folder / "val" / "images" / file_name, grayscale=index == 0)
        annotations.append(f"{file_name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(annotations))
    write_jpeg(folder / "test" / "images" / "test_0.JPEG")
    return folder


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """``array`` (uint8) as an IDX file: magic 0x0000 08 <dims>, big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as file:
            file.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fake_fashion_mnist(
    folder: str | Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0
) -> Path:
    """The four official Fashion-MNIST IDX files (random 28x28 images, labels 0..9) in
    ``folder``, gzipped (as the official and Debian's copies) unless ``gz`` is false."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), gz)
    return folder
