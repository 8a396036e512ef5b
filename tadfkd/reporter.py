"""What a run says after every epoch: one console line, the W&B record, an image grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from tadfkd import schema
from tadfkd.results import percent


class EpochReporter:
    """``__call__(epoch, metrics)`` after each epoch (0-based ``epoch``): prints the epoch's
    line, logs every metric to ``tracker`` at step ``epoch + 1``, and every ``image_every``
    epochs (and after the last) saves ``samples_epochNNNN.png``, an 8x8 grid of ``sample(64)``
    images in [0, 1], and logs it."""

    def __init__(
        self,
        tracker,
        run_dir: Path,
        epochs: int,
        image_every: int,
        sample: Callable[[int], torch.Tensor],
    ) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.epochs = epochs
        self.image_every = image_every
        self.sample = sample

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log(metrics, step=epoch + 1)
        print(self.line(epoch, metrics), flush=True)
        done = epoch + 1
        if self.image_every and (done % self.image_every == 0 or done == self.epochs):
            with torch.no_grad():
                grid = make_grid(self.sample(64).float().cpu(), nrow=8)
            save_image(grid, self.run_dir / f"samples_epoch{done:04d}.png")
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
