"""Datasets stored as image files in one folder per class, Tiny-ImageNet's layout: a file listing
the classes, ``<train>/<class>/...`` and ``<test>/<class>/...``, where the test images may come
flat in ``<test>/<unsorted>`` with an annotations file naming each one's class (Tiny-ImageNet's
labelled validation set, which serves as its test split); they are sorted into class folders on
first use. Images are read as RGB.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2.functional import pil_to_tensor

from tadfkd.base.errors import DatasetMissing, UserError


def read_rgb(path: str) -> torch.Tensor:
    """Image file as uint8 (3, H, W); some Tiny-ImageNet JPEGs are grayscale."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


class ClassFolders(ImageFolder):
    """ImageFolder whose classes are the given ones in sorted order, not the folders found.

    A stray folder (such as a leftover ``val/images``) thus never becomes a class.
    """

    channels = 3  # every image is read as RGB

    def __init__(
        self,
        directory: Path,
        classes: list[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.class_names = classes
        super().__init__(str(directory), transform=transform, loader=read_rgb)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        names = self.class_names
        return names, {name: index for index, name in enumerate(names)}


class ImageFolderSource:
    """One dataset of class folders, as ``conf/dataset/<name>.yaml`` describes it.

    ``folder`` holds ``classes_file`` (class names, whitespace-separated; indices follow their
    sorted order) and the split folders ``train`` and ``test``. With ``annotations`` (a file in
    the test folder, lines of ``<file>\\t<class>...``), the test images found flat in
    ``<test>/<unsorted>`` are first moved into ``<test>/<class>/``. ``how_to_get`` ends the
    message when files are missing. Never downloaded.
    """

    def __init__(
        self,
        title: str,
        folder: str,
        classes_file: str,
        train: str,
        test: str,
        how_to_get: str,
        annotations: str | None = None,
        unsorted: str = "images",
    ) -> None:
        self.title = title
        self.folder = Path(folder).expanduser()
        self.classes_file = self.folder / classes_file
        self.splits = {True: self.folder / train, False: self.folder / test}
        self.how_to_get = how_to_get
        self.annotations = annotations
        self.unsorted = unsorted

    def read(
        self, train: bool, download: bool, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> ClassFolders:
        """The training or the test split (``download`` is ignored: there is no download)."""
        if not self.classes_file.is_file():
            raise DatasetMissing(
                f"{self.title} not found: {self.classes_file} does not exist; {self.how_to_get}."
            )
        classes = sorted(self.classes_file.read_text().split())
        if not train and self.annotations:
            self._sort_test_images(self.splits[False])
        try:
            return ClassFolders(self.splits[train], classes, transform)
        except FileNotFoundError as error:
            raise UserError(
                f"{self.title} under {self.folder} is incomplete ({error}); {self.how_to_get}."
            ) from error

    def _sort_test_images(self, test: Path) -> None:
        """Move ``test/<unsorted>/<file>`` to ``test/<class>/<file>`` as the annotations list.

        Each move is an atomic rename, so an interrupted run leaves every image in exactly one
        of the two places and the next call finishes the job; the unsorted folder is removed
        last, and its absence marks the sort as done.
        """
        flat = test / self.unsorted
        if not flat.is_dir():
            return
        annotations = test / self.annotations
        if not annotations.is_file():
            raise UserError(
                f"{annotations} is missing, so the {self.title} test images cannot be sorted "
                f"into classes; {self.how_to_get}."
            )
        for line in annotations.read_text().splitlines():
            file_name, name = line.split("\t")[:2]
            target = test / name / file_name
            target.parent.mkdir(exist_ok=True)
            try:
                os.replace(flat / file_name, target)
            except FileNotFoundError:
                # already moved by an earlier, interrupted run (or by a concurrent one)
                if not target.is_file():
                    raise UserError(
                        f"Image {file_name} listed in {annotations} is in neither {flat} nor "
                        f"{target.parent}; {self.how_to_get}."
                    ) from None
        # stays if it holds files the annotations do not list, or a concurrent run removed it
        with suppress(OSError):
            flat.rmdir()
