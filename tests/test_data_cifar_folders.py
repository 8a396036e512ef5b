"""Datasets in CIFAR's pickle batches and in Tiny-ImageNet's class folders, read from files in the
official formats through the source their ``conf/dataset/<name>.yaml`` builds."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_fake_cifar, write_fake_tinyimagenet
from helpers import configured, dataset_source, translations
from torchvision.datasets import CIFAR10, CIFAR100

from tadfkd.base.errors import UserError
from tadfkd.data import cifar
from tadfkd.data.loading import load_split

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: every download attempt fails as it does offline."""

    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", fail)


# ---- CIFAR --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "torchvision_class"), [("cifar10", CIFAR10), ("cifar100", CIFAR100)]
)
def test_cifar_reads_the_same_as_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, torchvision_class: type[CIFAR10]
) -> None:
    write_fake_cifar(tmp_path, name, n_train=20, n_test=10, seed=1)
    # torchvision's own reader, its md5 check bypassed, is the reference for the format
    monkeypatch.setattr(torchvision_class, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision_class, "_load_meta", lambda self: None)
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    for split, size in (("train", 20), ("test", 10)):
        ours = load_split(
            dataset_source(name, tmp_path), split, CIFAR_MEAN, CIFAR_STD, download=False
        )
        reference = torchvision_class(str(tmp_path), train=split == "train", download=False)
        assert len(ours) == len(reference) == size
        for index in range(size):
            image, label = ours[index]
            reference_image, reference_label = reference[index]
            expected = torch.from_numpy(np.array(reference_image)).permute(2, 0, 1)
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert torch.allclose(image, (expected.float() / 255 - mean) / std)
            assert label == reference_label


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch dict pickled as Python 2 with numpy 1 did for the official files.

    Python 3 cannot write this encoding (byte strings as ``str``, ``numpy.core`` globals), so
    the opcodes are assembled by hand; ``data`` is uint8 (N, 3072) with N < 256.
    """

    def short_string(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"K\x00\x85"  # shape (0,)
        + short_string(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(K\x01K"
        + bytes([len(data)])
        + b"M\x00\x0c\x86"  # state: version 1, shape (N, 3072)
        + b"cnumpy\ndtype\n"
        + short_string(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + short_string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype uint8
        + b"\x89T"  # not Fortran order; raw bytes as a Python 2 str
        + len(data.tobytes()).to_bytes(4, "little")
        + data.tobytes()
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return (
        b"\x80\x02}(" + short_string(b"data") + array + short_string(b"labels") + label_list + b"u."
    )


def test_cifar_reads_python2_pickles(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10")
    images = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(python2_cifar_pickle(images, [7, 0, 9]))
    test = load_split(dataset_source("cifar10", tmp_path), "test", (0, 0, 0), (1, 1, 1))
    assert [label for _, label in test] == [7, 0, 9]
    expected = torch.from_numpy(images).view(3, 3, 32, 32).float() / 255
    assert torch.allclose(torch.stack([image for image, _ in test]), expected)


def test_cifar_augmentation_is_a_shift_or_mirrored_shift(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    plain = load_split(dataset_source("cifar10", tmp_path), "train", CIFAR_MEAN, CIFAR_STD)
    augmented = load_split(
        dataset_source("cifar10", tmp_path), "train", CIFAR_MEAN, CIFAR_STD, configured("cifar10")
    )
    black = -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(10):
        original, label = plain[3]
        image, augmented_label = augmented[3]
        assert image.shape == (3, 32, 32) and augmented_label == label
        shifted = any(torch.allclose(image, crop) for crop in translations(original, 4, black))
        flipped = original.flip(-1)
        mirrored = any(torch.allclose(image, crop) for crop in translations(flipped, 4, black))
        assert shifted or mirrored
        outcomes.add((shifted, mirrored))
    assert len(outcomes) == 2  # both flipped and unflipped crops occur


def test_cifar_missing_without_download_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar-10-batches-py") as raised:
        load_split(
            dataset_source("cifar10", tmp_path), "train", CIFAR_MEAN, CIFAR_STD, download=False
        )
    message = str(raised.value)
    assert str(tmp_path) in message and "runtime.download=false" in message
    assert "paths.data=/path" in message  # a key that exists


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_failed_download_names_the_folder(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(UserError, match="could not be downloaded") as raised:
        load_split(dataset_source(name, tmp_path), "test", CIFAR_MEAN, CIFAR_STD, download=True)
    message = str(raised.value)
    assert folder in message and str(tmp_path) in message and "URLError" in message


def test_cifar_missing_is_downloaded_then_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        write_fake_cifar(root, "cifar100", n_train=7, n_test=5)

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    test = load_split(dataset_source("cifar100", tmp_path), "test", CIFAR_MEAN, CIFAR_STD)
    assert len(test) == 5
    assert calls == [(CIFAR100.url, CIFAR100.filename, CIFAR100.tgz_md5)]
    load_split(dataset_source("cifar100", tmp_path), "train", CIFAR_MEAN, CIFAR_STD)
    assert len(calls) == 1  # present files are not fetched again


def test_cifar_partial_folder_counts_as_missing(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    load_split(dataset_source("cifar10", tmp_path), "test", CIFAR_MEAN, CIFAR_STD, download=False)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_split(
            dataset_source("cifar10", tmp_path), "train", CIFAR_MEAN, CIFAR_STD, download=False
        )


class Exploit:
    """Unpickling this would call ``print``: a stand-in for code in a foreign file."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "content",
    [
        {"data": Exploit(), "labels": []},
        {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
        ["not", "a", "dict"],
    ],
    ids=["code", "shape", "label-range", "not-a-dict"],
)
def test_cifar_foreign_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object
) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(UserError, match="test_batch is not a CIFAR-10 batch file"):
        load_split(dataset_source("cifar10", tmp_path), "test", CIFAR_MEAN, CIFAR_STD)
    assert "code ran" not in capsys.readouterr().out


# ---- Tiny-ImageNet ------------------------------------------------------------------------


def check_tiny_test_split(folder: Path, n_classes: int, n_val_per_class: int) -> None:
    """Load the test split and check that every image sits in, and is labelled as, its class."""
    test = load_split(
        dataset_source("tinyimagenet", folder.parent), "test", IMAGENET_MEAN, IMAGENET_STD
    )
    wnids = sorted((folder / "wnids.txt").read_text().split())
    annotated = dict(
        line.split("\t")[:2]
        for line in (folder / "val" / "val_annotations.txt").read_text().splitlines()
    )
    assert len(test) == n_classes * n_val_per_class
    assert test.classes == wnids
    for path, label in test.samples:
        assert annotated[Path(path).name] == wnids[label] == Path(path).parent.name
    assert not (folder / "val" / "images").exists()


def test_tinyimagenet_train_split(tmp_path: Path) -> None:
    folder = write_fake_tinyimagenet(tmp_path, n_classes=3, n_train_per_class=2)
    train = load_split(
        dataset_source("tinyimagenet", tmp_path), "train", IMAGENET_MEAN, IMAGENET_STD
    )
    wnids = sorted((folder / "wnids.txt").read_text().split())
    assert len(train) == 6 and train.classes == wnids
    for path, label in train.samples:
        assert Path(path).parent.parent.name == wnids[label]
    image, label = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 0


def test_tinyimagenet_sorts_validation_images_once(tmp_path: Path) -> None:
    folder = write_fake_tinyimagenet(tmp_path, n_classes=4, n_val_per_class=3)
    check_tiny_test_split(folder, 4, 3)
    check_tiny_test_split(folder, 4, 3)  # a second call finds the sort done


def test_tinyimagenet_finishes_an_interrupted_sort(tmp_path: Path) -> None:
    folder = write_fake_tinyimagenet(tmp_path, n_classes=3, n_val_per_class=4)
    val = folder / "val"
    # as if a first run was killed after moving half of the images
    for line in (val / "val_annotations.txt").read_text().splitlines()[:6]:
        file_name, wnid = line.split("\t")[:2]
        (val / wnid).mkdir(exist_ok=True)
        (val / "images" / file_name).rename(val / wnid / file_name)
    check_tiny_test_split(folder, 3, 4)


def test_tinyimagenet_grayscale_becomes_rgb_and_augments(tmp_path: Path) -> None:
    write_fake_tinyimagenet(tmp_path)
    test = load_split(dataset_source("tinyimagenet", tmp_path), "test", IMAGENET_MEAN, IMAGENET_STD)
    grayscale = next(i for i, (path, _) in enumerate(test.samples) if path.endswith("val_0.JPEG"))
    image, _ = test[grayscale]
    assert image.shape == (3, 64, 64)
    # the three channels agree once the per-channel normalisation is undone
    pixels = image * torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels += torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(pixels, pixels[:1].expand(3, -1, -1), atol=1e-5)
    augmented = load_split(
        dataset_source("tinyimagenet", tmp_path),
        "train",
        IMAGENET_MEAN,
        IMAGENET_STD,
        configured("tinyimagenet"),
    )
    assert augmented[0][0].shape == (3, 64, 64)


def test_tinyimagenet_missing_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tiny-imagenet-200") as raised:
        load_split(dataset_source("tinyimagenet", tmp_path), "train", IMAGENET_MEAN, IMAGENET_STD)
    assert str(tmp_path) in str(raised.value)


def test_tinyimagenet_lost_validation_image_is_reported(tmp_path: Path) -> None:
    folder = write_fake_tinyimagenet(tmp_path)
    (folder / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(UserError, match=r"val_1\.JPEG"):
        load_split(dataset_source("tinyimagenet", tmp_path), "test", IMAGENET_MEAN, IMAGENET_STD)
