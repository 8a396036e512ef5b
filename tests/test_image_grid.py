"""The image grid a run saves (and logs to W&B): every generated image scaled up to a readable
tile, nearest neighbour, and labelled with the teacher's class of it."""

import numpy as np
import pytest
import torch
from PIL import Image

from tadfkd.base import schema
from tadfkd.run.reporter import GRID_COLUMNS, GRID_IMAGES, TILE_GAP_PX, EpochReporter
from tadfkd.run.tracking import NullTracker

METRICS = {
    schema.STUDENT_ACC: 0.5,
    schema.SELECTION_RATE: 0.5,
    schema.AGREEMENT: 0.5,
    schema.EPOCH_SECONDS: 1.0,
}


def tile(grid: np.ndarray, index: int, size: int) -> np.ndarray:
    """Tile ``index`` (row-major) of a grid of ``size``-pixel tiles."""
    row, column = divmod(index, GRID_COLUMNS)
    top, left = (TILE_GAP_PX + n * (size + TILE_GAP_PX) for n in (row, column))
    return grid[top : top + size, left : left + size]


def saved_grid(tmp_path, images, classify=None) -> np.ndarray:
    reporter = EpochReporter(NullTracker(), tmp_path, 1, 1, lambda n: images[:n], classify)
    reporter(0, METRICS)
    return np.asarray(Image.open(tmp_path / "samples_epoch0001.png").convert("RGB"))


SIZES = [(16, 1, 64), (28, 1, 84), (32, 3, 64), (64, 3, 64)]  # digits, F-MNIST, CIFAR, Tiny


@pytest.mark.parametrize("image_px, channels, tile_px", SIZES)
def test_each_tile_is_its_image_scaled_up_by_a_whole_factor(tmp_path, image_px, channels, tile_px):
    torch.manual_seed(0)
    images = torch.rand(GRID_IMAGES, channels, image_px, image_px)
    grid = saved_grid(tmp_path, images)
    side = GRID_COLUMNS * (tile_px + TILE_GAP_PX) + TILE_GAP_PX
    assert grid.shape == (side, side, 3)
    scale = tile_px // image_px
    for index in range(GRID_IMAGES):
        image = (images[index] * 255).round().byte().permute(1, 2, 0).numpy()
        upscaled = image.repeat(scale, axis=0).repeat(scale, axis=1)
        assert np.array_equal(
            tile(grid, index, tile_px), np.broadcast_to(upscaled, (*upscaled.shape[:2], 3))
        )


@pytest.mark.parametrize("image_px, channels, tile_px", SIZES)
def test_each_tile_is_labelled_with_the_teachers_class_in_its_corner(
    tmp_path, image_px, channels, tile_px
):
    images = torch.full((GRID_IMAGES, channels, image_px, image_px), 0.5)
    classes = torch.arange(GRID_IMAGES) % 10
    (tmp_path / "plain").mkdir()
    plain = saved_grid(tmp_path / "plain", images)
    grid = saved_grid(tmp_path, images, lambda batch: classes[: len(batch)])
    assert grid.shape == plain.shape
    tiles = [tile(grid, index, tile_px) for index in range(GRID_IMAGES)]
    for index, labelled in enumerate(tiles):
        changed = (labelled != tile(plain, index, tile_px)).any(axis=-1)
        rows, columns = np.nonzero(changed)
        assert rows.size, f"no label on tile {index}"
        assert rows.max() < tile_px // 2 and columns.max() < tile_px // 2  # in the corner
        red, green, blue = (labelled[changed][:, c].astype(int) for c in range(3))
        assert ((red > 200) & (green > 200) & (blue < 100)).any()  # yellow text
    # the label says the class: the same on tiles of one class, different between classes
    assert all(np.array_equal(tiles[i], tiles[i + 10]) for i in range(10))
    assert len({tiles[i].tobytes() for i in range(10)}) == 10
