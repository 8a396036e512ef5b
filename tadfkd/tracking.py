"""Experiment tracking: Weights & Biases (offline by default) or nothing.

A run must never hang on the network: online mode has a bounded init timeout and falls back to
offline mode with a warning (``wandb sync <run dir>/wandb/offline-run-*`` uploads it later), and
a W&B error while logging warns once and is otherwise ignored: training goes on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class NullTracker:
    """Logs nothing (``logger=none``)."""

    run_id: str | None = None

    def __init__(self, **_tracker_arguments: Any) -> None:
        """Accept (and ignore) the arguments every tracker is built with."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Drop ``metrics``."""

    def log_images(self, key: str, grid: torch.Tensor, step: int) -> None:
        """Drop the image grid."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Drop the summary."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker:
    """One W&B run: resolved config, per-epoch metrics, image grids and a summary.

    ``mode`` is ``offline`` (default), ``online`` or ``disabled``; the usual ``WANDB_*``
    environment variables apply. Files go under ``directory`` (the Hydra run directory).
    """

    def __init__(
        self,
        directory: str | Path,
        run_config: Mapping[str, Any],
        project: str = "tadfkd",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        init_timeout: float = 60.0,
        run_id: str | None = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=[str(tag)[:64] for tag in tags],
            config=dict(run_config),
            dir=str(directory),
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=init_timeout, console="off", silent=True),
        )
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as error:  # noqa: BLE001 - any W&B failure must not stop training
            if mode != "online":
                raise
            warnings.warn(
                f"W&B online init failed ({type(error).__name__}); logging offline instead, "
                f"upload later with: wandb sync {directory / 'wandb'}/offline-run-*",
                stacklevel=2,
            )
            self.run = wandb.init(mode="offline", **kwargs)
        self.run_id = self.run.id
        self._failed = False

    def _guarded(self, action: str, call: Callable[[], None]) -> None:
        """Run one W&B call; its first failure warns (type only: messages may hold secrets)."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - W&B trouble must not stop training
            if not self._failed:
                warnings.warn(
                    f"W&B {action} failed ({type(error).__name__}); training goes on, later W&B "
                    "failures are not reported",
                    stacklevel=3,
                )
            self._failed = True

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._guarded("log", lambda: self.run.log(dict(metrics), step=step))

    def log_images(self, key: str, grid: torch.Tensor, step: int) -> None:
        """Log an image grid (C, H, W) with values in [0, 1]."""
        array = (grid.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        if array.shape[2] == 1:
            array = array[:, :, 0]
        self._guarded("log", lambda: self.run.log({key: self._wandb.Image(array)}, step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        def write() -> None:
            for key, value in values.items():
                self.run.summary[key] = value

        self._guarded("summary", write)

    def finish(self) -> None:
        self._guarded("finish", self.run.finish)
