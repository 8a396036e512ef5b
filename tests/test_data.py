"""Datasets: the digits split, Fashion-MNIST's IDX files, the dataset options, transforms and
loaders, each dataset read through the source its ``conf/dataset/<name>.yaml`` builds, and the
same tensors as before the sources (CIFAR and Tiny-ImageNet: tests/test_data_cifar_folders.py)."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from fakedata import write_fake_cifar, write_fake_fashion_mnist, write_idx
from helpers import compose_config, configured, dataset_source, options, translations
from hydra.errors import MissingConfigException

from tadfkd.base.errors import DatasetMissing, UserError
from tadfkd.data import cifar
from tadfkd.data.idx import IDX_IMAGES, IDX_LABELS, read_idx
from tadfkd.data.loading import Augmentation, ImageTransform, load_split, make_loader
from tadfkd.run.checks import check_same_run, run_identity

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: every download attempt fails as it does offline."""

    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", fail)
    # the downloaders the IDX datasets' YAML names, looked up when their source is built
    for name in ("FashionMNIST", "MNIST", "KMNIST"):
        monkeypatch.setattr(torchvision.datasets, name, fail)


@pytest.fixture
def no_system_fashion_mnist(tmp_path: Path) -> Path:
    """An empty folder to stand in for Debian's, so that tests see only the files they write."""
    return tmp_path / "system-fashion-mnist"


def fashion_mnist(data: Path, system: Path):
    """Fashion-MNIST's source under ``paths.data=data`` with ``system`` for Debian's folder
    (the last one its YAML lists)."""
    return dataset_source("fashion_mnist", data, f"dataset.source.folders.3={system}")


# ---- digits -------------------------------------------------------------------------------


def test_digits_split_sizes_shapes_and_range() -> None:
    train = load_split(dataset_source("digits"), "train", (0.5,), (0.5,))
    test = load_split(dataset_source("digits"), "test", (0.5,), (0.5,))
    assert (len(train), len(test)) == (1347, 450)
    image, label = train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    # pixels in [0, 1] normalised with mean 0.5, std 0.5 land in [-1, 1], using the full range
    images = torch.stack([image for image, _ in test])
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.99 and images.max() > 0.5


def test_digits_split_is_fixed_and_disjoint() -> None:
    first = load_split(dataset_source("digits"), "test", (0.0,), (1.0,))
    second = load_split(dataset_source("digits"), "test", (0.0,), (1.0,))
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    train = load_split(dataset_source("digits"), "train", (0.0,), (1.0,))
    train_rows = {tuple(image.flatten().tolist()) for image in train.images}
    assert not any(tuple(image.flatten().tolist()) in train_rows for image in first.images)


def test_digits_split_is_stratified() -> None:
    train = load_split(dataset_source("digits"), "train", (0.0,), (1.0,))
    test = load_split(dataset_source("digits"), "test", (0.0,), (1.0,))
    train_counts = torch.bincount(train.labels, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    # each class is split 3:1 up to rounding
    expected_test = (train_counts + test_counts).float() * 0.25
    assert torch.all((test_counts.float() - expected_test).abs() <= 1)


def test_digits_augmentation_shifts_but_never_mirrors() -> None:
    plain = load_split(dataset_source("digits"), "train", (0.5,), (0.5,))
    augmented = load_split(
        dataset_source("digits"), "train", (0.5,), (0.5,), augmentation=configured("digits")
    )
    torch.manual_seed(0)
    black = torch.tensor([-1.0])  # (0 - 0.5) / 0.5
    asymmetric = 0
    for index in range(20):
        original, label = plain[index]
        image, augmented_label = augmented[index]
        assert image.shape == (1, 16, 16) and augmented_label == label
        crops = translations(original, 2, black)
        assert any(torch.allclose(image, crop) for crop in crops)
        asymmetric += not any(torch.allclose(original.flip(-1), crop) for crop in crops)
    assert asymmetric >= 10  # for these a flip would have failed the check above


# ---- Fashion-MNIST ------------------------------------------------------------------------

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `make data`


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "fashion-mnist", "."])
def test_fashion_mnist_reads_the_idx_files_gzipped_or_not_in_each_layout(
    tmp_path: Path, no_system_fashion_mnist: Path, gz: bool, layout: str
) -> None:
    folder = write_fake_fashion_mnist(tmp_path / "data" / layout, n_train=12, n_test=7, gz=gz)
    train = load_split(
        fashion_mnist(tmp_path / "data", no_system_fashion_mnist), "train", FMNIST_MEAN, FMNIST_STD
    )
    test = load_split(
        fashion_mnist(tmp_path / "data", no_system_fashion_mnist), "test", FMNIST_MEAN, FMNIST_STD
    )
    assert (len(train), len(test)) == (12, 7)
    image, label = test[3]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    # the pixels and labels written, in order, normalised with the given constants
    suffix = ".gz" if gz else ""
    raw = read_idx(folder / f"t10k-images-idx3-ubyte{suffix}", IDX_IMAGES)
    labels = read_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", IDX_LABELS)
    expected = (torch.from_numpy(raw[3].copy()).float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    assert torch.allclose(image[0], expected) and label == int(labels[3])


def test_fashion_mnist_falls_back_to_debians_folder(
    tmp_path: Path, no_system_fashion_mnist: Path
) -> None:
    write_fake_fashion_mnist(no_system_fashion_mnist, n_train=5, n_test=3)
    test = load_split(
        fashion_mnist(tmp_path / "empty", no_system_fashion_mnist), "test", FMNIST_MEAN, FMNIST_STD
    )
    assert len(test) == 3


def test_missing_fashion_mnist_names_both_ways_to_get_it(
    tmp_path: Path, no_system_fashion_mnist: Path
) -> None:
    for download in (False, True):  # with download on, the (offline) download fails
        with pytest.raises(DatasetMissing) as caught:
            load_split(
                fashion_mnist(tmp_path, no_system_fashion_mnist),
                "test",
                (0.5,),
                (0.5,),
                download=download,
            )
        message = str(caught.value)
        assert "make data" in message and "FashionMNIST/raw" in message
        assert ("runtime.download=false" in message) is not download
        assert ("could not be downloaded" in message) is download


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("magic", "magic number"),
        ("truncated", "bytes of data"),
        ("labels", "labels outside"),
        ("count", "images but"),
        ("size", "not 28x28"),
        ("gzip", "cannot be read"),
    ],
)
def test_damaged_fashion_mnist_files_are_one_sentence(
    tmp_path: Path, no_system_fashion_mnist: Path, damage: str, reason: str
) -> None:
    folder = write_fake_fashion_mnist(tmp_path, n_train=4, n_test=4, gz=False)
    images, labels = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    rng = np.random.default_rng(1)
    if damage == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-10])
    elif damage == "labels":
        write_idx(labels, np.array([0, 1, 10, 2]))
    elif damage == "count":
        write_idx(labels, np.array([0, 1, 2]))
    elif damage == "size":
        write_idx(images, rng.integers(0, 256, (4, 32, 32)))
    else:
        images.unlink()
        images.with_name(images.name + ".gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=reason) as caught:
        load_split(
            fashion_mnist(tmp_path, no_system_fashion_mnist), "test", FMNIST_MEAN, FMNIST_STD
        )
    assert "dataset-fashion-mnist" in str(caught.value)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make data)",
)
def test_debians_fashion_mnist_is_the_official_dataset() -> None:
    train = load_split(
        dataset_source("fashion_mnist", "/nonexistent"), "train", FMNIST_MEAN, FMNIST_STD
    )
    test = load_split(
        dataset_source("fashion_mnist", "/nonexistent"), "test", FMNIST_MEAN, FMNIST_STD
    )
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    pixels = train.images.float() / 255
    # the normalisation constants of the dataset option are the training set's
    assert pixels.mean().item() == pytest.approx(FMNIST_MEAN[0], abs=5e-5)
    assert pixels.std().item() == pytest.approx(FMNIST_STD[0], abs=5e-5)


# ---- names, arguments and loaders ---------------------------------------------------------


def test_every_dataset_option_builds_a_source_and_its_images_fit_it() -> None:
    # What a dataset is lives in its config option only; the code holds readers of formats.
    for option in options("dataset"):
        node = compose_config([f"dataset={option}"]).dataset
        assert node.name == option and node.source._target_.startswith("tadfkd.data.")
        assert node.image_size % 4 == 0 and node.channels in (1, 3) and node.num_classes >= 2
        source = dataset_source(option)
        assert callable(source.read) and source.title
    digits = load_split(dataset_source("digits"), "test", (0.5,), (0.5,))
    assert digits[0][0].shape == (1, 16, 16)  # conf/dataset/digits.yaml: 16 px, 1 channel


def test_random_erasing_zeroes_one_rectangle_after_normalisation() -> None:
    torch.manual_seed(0)
    image = torch.full((1, 28, 28), 200, dtype=torch.uint8)
    transform = ImageTransform((0.2,), (0.5,), Augmentation(erase=1.0))
    plain = (200 / 255 - 0.2) / 0.5
    for _ in range(20):
        out = transform(image)[0]
        zero = out == 0
        assert zero.any() and torch.allclose(out[~zero], torch.tensor(plain))
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        # one filled rectangle of 2-33% of the image
        assert zero.sum() == len(rows) * len(cols)
        assert 0.02 * 784 - 28 <= zero.sum() <= 0.33 * 784 + 28
    assert torch.allclose(
        ImageTransform((0.2,), (0.5,), Augmentation())(image), torch.tensor(plain)
    )


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(MissingConfigException, match="Could not find 'dataset/emnist'") as caught:
        compose_config(["dataset=emnist"])
    assert all(f"\t{option}\n" in str(caught.value) for option in options("dataset"))


def test_bad_split_and_channel_count_are_user_errors() -> None:
    with pytest.raises(UserError, match="'val'"):
        load_split(dataset_source("digits"), "val", (0.5,), (0.5,))
    with pytest.raises(UserError, match="one value per channel"):
        load_split(dataset_source("digits"), "train", CIFAR_MEAN, CIFAR_STD)


def test_transform_normalises_uint8_like_to_tensor() -> None:
    image = torch.arange(12, dtype=torch.uint8).view(3, 2, 2) * 20
    out = ImageTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image)
    assert torch.allclose(out, (image.float() / 255 - 0.5) / 0.25)
    # float images are not changed in place
    floats = image.float() / 255
    ImageTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(floats)
    assert torch.equal(floats, image.float() / 255)


def test_loader_order_depends_only_on_the_seed() -> None:
    dataset = load_split(dataset_source("digits"), "test", (0.5,), (0.5,))

    def labels(seed: int) -> torch.Tensor:
        loader = make_loader(dataset, 64, shuffle=True, seed=seed)
        return torch.cat([batch_labels for _, batch_labels in loader])

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))
    images, batch_labels = next(iter(make_loader(dataset, 64, shuffle=False)))
    assert images.shape == (64, 1, 16, 16) and batch_labels.dtype == torch.int64
    assert torch.equal(batch_labels, dataset.labels[:64])


def test_loader_with_workers_augments_deterministically(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    dataset = load_split(
        dataset_source("cifar10", tmp_path), "train", CIFAR_MEAN, CIFAR_STD, configured("cifar10")
    )

    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(make_loader(dataset, 8, True, num_workers=2, seed=seed)))[0]

    assert torch.equal(first_batch(5), first_batch(5))


# ---- the same tensors as the readers before the YAML sources ------------------------------

# sha256 of the batches (images, labels) of make_loader(split, 7, seed=3) over the files the
# fakedata writers write with their defaults: the training split in order, the test split in
# order, and the training split augmented and shuffled after torch.manual_seed(0); taken from
# the per-dataset readers the sources replaced (tadfkd/data/sources.py at 078f690)
BEFORE = {
    "digits": (
        "d8b55d74e1ae7f425dd79c806345607af5e5c1701d8995dea8a3fccb66328ddc",
        "ae212af0d8c444561a179be2cc6273055e22105876a6f32083a389a4835100ec",
        "43996d80c5db0a5b68e94556cc94db1b68cc2e91678bbf09ad75661a3a8acef6",
    ),
    "fashion_mnist": (
        "f4cc4d9491db55df573e2c48e9eaf6fa0a7ee38f8671f2f20616d738601072ee",
        "83eb17bd4675a5f8ee80283d231c19e7f4acd1e1f0276d16c305f33d50482dca",
        "3e901e0a71687263d06a1a846fbcf98be08594a928980f39c78882dd26267928",
    ),
    "cifar10": (
        "7517d019536972727fbe687b58d8c56404874483930fe46d0a9721554044e7b8",
        "45651dd115a7d4e100df21423f0bcc8997cae8de9bcc99bd511d3049d46114ed",
        "613e642093d7142473173190505f46467cb61b853933ee2b44fce6a1a3fac65b",
    ),
    "cifar100": (
        "ba0e992085e5f1f404c02a238f6a467b471a7d0fd86f22ca68be11fea878246f",
        "8961c61d4eb5a8d5474ce8d0dc3edd00b6f48f80bd66a0967f08eeb7a1090b23",
        "dfd9c6eee7a966da6aead54aea11ab2951bb411451c8c12cb15bba3f2865cc59",
    ),
}
# normalisation and augmentation (crop padding, flip, erasing) of each digest
SETTINGS = {
    "digits": ((0.5,), (0.5,), Augmentation(2, False)),
    "fashion_mnist": (FMNIST_MEAN, FMNIST_STD, Augmentation(2, True, 0.5)),
    "cifar10": (CIFAR_MEAN, CIFAR_STD, Augmentation(4, True)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), Augmentation(4, True)),
}


def batches_digest(dataset, augmentation_seed: int | None = None) -> str:
    digest = hashlib.sha256()
    if augmentation_seed is not None:
        torch.manual_seed(augmentation_seed)
    shuffle = augmentation_seed is not None
    for images, labels in make_loader(dataset, 7, shuffle=shuffle, seed=3):
        digest.update(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_sources_give_the_tensors_the_previous_readers_gave(
    tmp_path: Path, no_system_fashion_mnist: Path, name: str
) -> None:
    if name == "fashion_mnist":
        write_fake_fashion_mnist(tmp_path / "fashion-mnist")
        source = fashion_mnist(tmp_path, no_system_fashion_mnist)
    else:
        if name.startswith("cifar"):
            write_fake_cifar(tmp_path, name)
        source = dataset_source(name, tmp_path)
    mean, std, augmentation = SETTINGS[name]
    train = load_split(source, "train", mean, std, download=False)
    test = load_split(source, "test", mean, std, download=False)
    augmented = load_split(source, "train", mean, std, augmentation, download=False)
    digests = (batches_digest(train), batches_digest(test), batches_digest(augmented, 0))
    assert digests == BEFORE[name]


def test_where_a_dataset_is_read_from_is_no_part_of_what_a_run_computes() -> None:
    def identity(*overrides: str) -> dict:
        cfg = compose_config(["dataset=fashion_mnist", *overrides], hydra_node=False)
        return run_identity(cfg, "a" * 64)

    base = identity()
    assert not any(key.startswith("dataset.source") for key in base)
    assert "dataset.name" in base and "dataset.image_size" in base
    moved = identity("paths.data=/elsewhere", "dataset.source.folders=[/x]")
    check_same_run(base, moved, Path("checkpoint.pt"))
