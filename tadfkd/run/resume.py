"""Resuming a job: what its checkpoint holds, whether one in the run directory is this run's and
already finished, continuing the distiller from it, and what a run stopped early leaves and how
to go on (the file format itself is ``checkpoint``'s)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tadfkd.base import schema
from tadfkd.base.errors import Interrupted, NonFiniteLoss, UserError
from tadfkd.distillation.loop import Distiller
from tadfkd.run.checkpoint import (
    LATEST,
    PREVIOUS,
    RNG_KEYS,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tadfkd.run.checks import check_same_run
from tadfkd.run.results import load_results
from tadfkd.run.rundir import ensure_writable

log = logging.getLogger(__name__)

# What a checkpoint of the job holds (``save_job_checkpoint``), checked when it is loaded: a file
# without one of these is as damaged as one cut short.
CHECKPOINT_KEYS = {
    "identity": (),
    "distiller": Distiller.STATE_KEYS,
    "rng": RNG_KEYS,
    "wandb_run_id": (),
}
# A checkpoint as loaded: its state and the file it was read from.
Saved = tuple[dict[str, Any], Path]


def run_directory(cfg: DictConfig, run_dir: Path) -> Path:
    """Where the run's files go: ``resume=DIR`` when given (it must hold a checkpoint), else
    Hydra's run directory; checked to be writable."""
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        if not has_checkpoint(run_dir):
            raise UserError(
                f"resume={run_dir} holds no {LATEST}; give the run directory to resume."
            )
    ensure_writable(run_dir)
    return run_dir


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists()


def load_saved(run_dir: Path, identity: dict[str, Any]) -> Saved | None:
    """The checkpoint in ``run_dir`` (None when there is none), refused when it is another
    run's (``identity`` differs)."""
    saved = load_checkpoint(run_dir, CHECKPOINT_KEYS)
    if saved is not None:
        check_same_run(saved[0]["identity"], identity, saved[1])
    return saved


def finished_results(saved: Saved | None, epochs: int, run_dir: Path) -> dict[str, Any] | None:
    """``results.json`` of a run whose checkpoint ``saved`` is final (after ``epochs``); None
    when the run is not finished, or its results are missing or cannot be trusted (cut short,
    damaged, edited: warned): the final checkpoint rebuilds them."""
    if saved is None or saved[0]["distiller"]["epoch"] < epochs:
        return None
    path = run_dir / schema.RESULTS_FILE
    if not path.exists():
        return None
    try:
        return load_results(run_dir)
    except (OSError, ValueError) as error:
        log.warning(f"{path} is unreadable ({error}); rebuilding it from the final checkpoint")
        return None


def restore(distiller: Distiller, saved: Saved) -> None:
    """Continue ``distiller`` (and the global RNGs) from the checkpoint ``saved``."""
    state, path = saved
    distiller.load_state_dict(state["distiller"])
    set_rng_state(state["rng"])
    schedule = distiller.schedule
    log.info(
        f"resuming from {path}: {distiller.epoch} of {schedule.epochs} epochs and "
        f"{distiller.iteration} of {schedule.iters_per_epoch} iterations of the next done"
    )


def save_job_checkpoint(
    run_dir: Path, identity: dict[str, Any], distiller: Distiller, wandb_run_id: str | None
) -> None:
    """Checkpoint the job (the keys of ``CHECKPOINT_KEYS``) into ``run_dir``."""
    save_checkpoint(
        run_dir,
        {
            "identity": identity,
            "distiller": distiller.state_dict(),
            "rng": rng_state(),
            "wandb_run_id": wandb_run_id,
        },
    )


def stopped_outside_training(signal_name: str, run_dir: Path) -> Interrupted:
    """What a stop signal outside the training loop leaves, and how to go on."""
    if has_checkpoint(run_dir):
        kept = f"the last checkpoint in {run_dir} is kept; re-run the same command to resume"
    else:
        kept = "nothing was checkpointed yet; re-run the same command to start the run"
    return Interrupted(f"{signal_name} received outside the training loop; {kept}.", signal_name)


def stopped_in_training(distiller: Distiller, run_dir: Path) -> Interrupted:
    """What a stop signal in the training loop leaves (a checkpoint), and how to go on."""
    schedule = distiller.schedule
    return Interrupted(
        f"{distiller.stop_reason} received; checkpoint saved after {distiller.epoch} of "
        f"{schedule.epochs} epochs and {distiller.iteration} iterations of the next in "
        f"{run_dir}; re-run the same command to resume.",
        distiller.stop_reason,
    )


def nonfinite_advice(error: NonFiniteLoss, run_dir: Path) -> NonFiniteLoss:
    """``error`` completed with what is kept and how to go on."""
    kept = (
        f"the last good checkpoint is kept in {run_dir}"
        if (run_dir / LATEST).exists()
        else "no checkpoint was written yet"
    )
    return NonFiniteLoss(
        f"{error}; {kept}; re-run with runtime.on_nonfinite=skip to skip such steps, or "
        "lower the learning rates in a new run directory."
    )
