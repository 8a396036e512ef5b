"""Extension point of the data: a new dataset in a known file format is one YAML file.

The test writes a small dataset in the IDX format (MNIST's) and ``dataset/glyphs.yaml`` into a
config folder of its own, puts that folder on Hydra's search path, and reads the dataset
through the ``dataset.source`` node and ``load_split``, as the jobs do: no edit of ``tadfkd/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_idx
from helpers import compose_config
from hydra.utils import instantiate

from tadfkd.base.errors import DatasetMissing, UserError
from tadfkd.data.loading import load_split, make_loader
from tadfkd.run.checks import check_rules

GLYPHS_YAML = """\
name: glyphs
num_classes: 5
image_size: 16
channels: 1
source:
  _target_: tadfkd.data.idx.IDXSource
  title: Glyphs
  folders: ["${paths.data}/glyphs"]
  train_files: [glyphs-train-images, glyphs-train-labels]
  test_files: [glyphs-test-images, glyphs-test-labels]
  image_size: ${..image_size}
  num_classes: ${..num_classes}
  how_to_get: put the four glyphs-* files in ${paths.data}/glyphs
views: {crop_padding: 2, flip: false}
augmentation: {crop_padding: 2, flip: false}
"""
MEAN, STD = (0.25,), (0.5,)


@pytest.fixture
def glyphs(tmp_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The config folder and the four IDX files (training images gzipped); returns the arrays
    written, by split."""
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "glyphs.yaml").write_text(GLYPHS_YAML)
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 9), ("test", 6)):
        images = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        labels = np.arange(n) % 5  # every class, the last one included
        write_idx(tmp_path / "data" / "glyphs" / f"glyphs-{split}-images", images, split == "train")
        write_idx(tmp_path / "data" / "glyphs" / f"glyphs-{split}-labels", labels)
        written[split] = (images, labels)
    return written


def glyphs_config(tmp_path: Path, *overrides: str):
    """The run's config with ``dataset=glyphs``, found through the test's own config folder."""
    return compose_config(
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "dataset=glyphs",
            f"paths.data={tmp_path / 'data'}",
            *overrides,
        ],
        hydra_node=False,
    )


def test_a_new_idx_dataset_is_one_yaml_file(tmp_path: Path, glyphs: dict) -> None:
    cfg = glyphs_config(tmp_path)
    check_rules(cfg, "dataset")  # the values run.py checks
    source = instantiate(cfg.dataset.source)
    for split, (images, labels) in glyphs.items():
        dataset = load_split(source, split, MEAN, STD, download=False)
        assert len(dataset) == len(labels) and dataset.channels == cfg.dataset.channels
        batch, batch_labels = next(iter(make_loader(dataset, len(labels), shuffle=False)))
        assert batch.shape == (len(labels), 1, 16, 16) and batch.dtype == torch.float32
        assert batch_labels.tolist() == labels.tolist()
        expected = (torch.from_numpy(images).float().unsqueeze(1) / 255 - MEAN[0]) / STD[0]
        assert torch.allclose(batch, expected)


def test_the_new_datasets_yaml_checks_its_files_and_says_how_to_get_them(
    tmp_path: Path, glyphs: dict
) -> None:
    # labels 0..4 do not fit four classes: the YAML's class count is what the files are checked by
    fewer = instantiate(glyphs_config(tmp_path, "dataset.num_classes=4").dataset.source)
    with pytest.raises(UserError, match=r"Glyphs file .*\(labels outside 0\.\.3"):
        load_split(fewer, "test", MEAN, STD)
    elsewhere = instantiate(glyphs_config(tmp_path, "paths.data=/nonexistent").dataset.source)
    with pytest.raises(DatasetMissing, match="put the four glyphs-. files in /nonexistent/glyphs"):
        load_split(elsewhere, "test", MEAN, STD)
