"""What a run says after every epoch: one line (console and ``run.log``), the W&B record, and a
readable grid of generated images, each labelled with the teacher's class."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from tadfkd.base import schema
from tadfkd.run.results import percent

log = logging.getLogger(__name__)

GRID_IMAGES = 64  # images in a grid, GRID_COLUMNS a row
GRID_COLUMNS = 8
MIN_TILE_PX = 64  # each image is scaled up (nearest neighbour) to at least this width
TILE_GAP_PX = 2  # black border between tiles


def labelled_grid(images: torch.Tensor, classes: Sequence[int] | None = None) -> np.ndarray:
    """``images`` (N, C, H, W) in [0, 1] as one RGB grid (uint8, rows x cols x 3) of
    ``GRID_COLUMNS`` tiles a row: each image scaled up by a whole factor to at least
    ``MIN_TILE_PX`` pixels, and, with ``classes`` (N,), labelled with its class in a corner."""
    scale = max(1, math.ceil(MIN_TILE_PX / images.shape[-1]))
    tiles = F.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)  # grey images on an RGB canvas: labels in colour
    grid = make_grid(tiles.clamp(0, 1), nrow=GRID_COLUMNS, padding=TILE_GAP_PX)
    picture = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy())
    if classes is not None:
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default(size=max(10, tiles.shape[-1] // 4))
        step = tiles.shape[-1] + TILE_GAP_PX
        for index, label in enumerate(classes):
            row, column = divmod(index, GRID_COLUMNS)
            corner = (TILE_GAP_PX + column * step + 1, TILE_GAP_PX + row * step)
            draw.rectangle(draw.textbbox(corner, str(label), font=font), fill=(0, 0, 0))
            draw.text(corner, str(label), fill=(255, 255, 0), font=font)
    return np.asarray(picture)


class EpochReporter:
    """``__call__(epoch, metrics)`` after each epoch (0-based ``epoch``): logs the epoch's line
    (to the console and the run's ``run.log``), logs every metric to ``tracker`` at epoch
    ``epoch + 1``, and every ``image_every`` epochs (and after the last) saves
    ``samples_epochNNNN.png``, a grid of ``sample(GRID_IMAGES)`` images in [0, 1] labelled with
    ``classify(images)`` (the teacher's class of each, when given), and logs it."""

    def __init__(
        self,
        tracker,
        run_dir: Path,
        epochs: int,
        image_every: int,
        sample: Callable[[int], torch.Tensor],
        classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.epochs = epochs
        self.image_every = image_every
        self.sample = sample
        self.classify = classify

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log(metrics, step=epoch + 1)
        log.info(self.line(epoch, metrics))
        done = epoch + 1
        if self.image_every and (done % self.image_every == 0 or done == self.epochs):
            with torch.no_grad():
                images = self.sample(GRID_IMAGES)
                classes = None if self.classify is None else self.classify(images).tolist()
            grid = labelled_grid(images, classes)
            Image.fromarray(grid).save(self.run_dir / f"samples_epoch{done:04d}.png")
            self.tracker.log_images("samples", grid, step=done)

    def line(self, epoch: int, metrics: dict[str, float]) -> str:
        """``epoch E/N: student test accuracy A%, selection rate R%, ...`` (percent, seconds)."""
        return (
            f"epoch {epoch + 1}/{self.epochs}: student test accuracy "
            f"{percent(metrics[schema.STUDENT_ACC])}, selection rate "
            f"{100 * metrics[schema.SELECTION_RATE]:.1f}%, student loss "
            f"{metrics.get(schema.STUDENT_LOSS, float('nan')):.4f}, "
            f"teacher-student agreement {100 * metrics[schema.AGREEMENT]:.1f}% "
            f"({metrics[schema.EPOCH_SECONDS]:.1f} s)"
        )
