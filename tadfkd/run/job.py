"""The distillation job behind ``run.py``: check the config, build the run, resume it if a
checkpoint is there, train with an epoch reporter, write the results."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tadfkd.base import schema
from tadfkd.base.errors import Interrupted, NonFiniteLoss, SignalReceived, UserError, exit_code
from tadfkd.base.files import remove_stale_temporaries
from tadfkd.distillation.evaluation import evaluate
from tadfkd.distillation.loop import Distiller
from tadfkd.run.builder import build_distiller, load_test_set
from tadfkd.run.checkpoint import (
    LATEST,
    PREVIOUS,
    RNG_KEYS,
    load_checkpoint,
    raise_signal_received,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_on_signals,
)
from tadfkd.run.checks import RUNTIME_NODES, check_same_run, run_identity, validate
from tadfkd.run.reporter import EpochReporter
from tadfkd.run.results import (
    load_results,
    percent,
    print_done,
    save_results,
    save_student,
    summarise,
)
from tadfkd.run.rundir import ensure_writable, lock, save_hydra_record, unlock
from tadfkd.run.runtime import (
    build,
    check_resolvable,
    command_line_overrides,
    redact_secrets,
    resolve_device,
    seed_everything,
    set_threads,
    source_commit,
)
from tadfkd.run.tracking import dashboard_config
from tadfkd.teachers.loading import Teacher, check_trained_on, teacher_sha256

log = logging.getLogger(__name__)

# What a checkpoint of the job holds (see ``train``), checked when it is loaded: a file without
# one of these is as damaged as one cut short.
CHECKPOINT_KEYS = {
    "identity": (),
    "distiller": Distiller.STATE_KEYS,
    "rng": RNG_KEYS,
    "wandb_run_id": (),
}


def name_teacher_after_its_file(cfg: DictConfig) -> None:
    """Name a teacher given as ``teacher.checkpoint=... teacher.arch=...`` on the command line
    after its file (unless ``teacher.name=`` is given too): the option's name is another
    network's."""
    if not HydraConfig.initialized():
        return
    keys = {item.split("=", 1)[0].lstrip("+~") for item in command_line_overrides()}
    if {"teacher.checkpoint", "teacher.arch"} <= keys and "teacher.name" not in keys:
        cfg.teacher.name = Path(cfg.teacher.checkpoint).stem


# Top-level keys a run name leaves out: already in it, or where and how the run goes.
UNNAMED_KEYS = (
    *RUNTIME_NODES,
    "method",
    "student",
    "teacher",
    "seed",
    "debug",
    "experiment",
    "sweep",
)


def run_name(cfg: DictConfig) -> str:
    """Readable run name, e.g. ``tadfkd-resnet18@cifar10_resnet34_9546-s0``, followed by the
    command line's other settings of what is computed (e.g. ``selection.threshold=0.4``), so
    that the jobs of one sweep have different names."""
    name = f"{cfg.method.name}-{cfg.student.arch}@{cfg.teacher.name}-s{cfg.seed}"
    others = [
        override
        for override in command_line_overrides()
        if override.lstrip("+~").split("=")[0].split(".")[0].split("/")[0] not in UNNAMED_KEYS
    ]
    return " ".join([name, *others])


def run_group(cfg: DictConfig) -> str | None:
    """W&B group: ``logger.group`` when set, else the sweep's name, which every job of one sweep
    shares (``python -m tadfkd.report entity/project/<group>`` reads them): the sweep
    directory's name in a multirun, the sweep's id in a W&B agent's job; else none."""
    group = OmegaConf.select(cfg, "logger.group")
    if group:
        return str(group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return os.environ.get("WANDB_SWEEP_ID") or None  # set by `wandb agent` for its jobs


def run_directory(cfg: DictConfig, run_dir: Path) -> Path:
    """Where the run's files go: ``resume=DIR`` when given (it must hold a checkpoint), else
    Hydra's run directory; checked to be writable."""
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        if not ((run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists()):
            raise UserError(
                f"resume={run_dir} holds no {LATEST}; give the run directory to resume."
            )
    ensure_writable(run_dir)
    return run_dir


def distil(cfg: DictConfig, run_dir: Path, record: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one distillation job; returns the contents of ``results.json`` (also written).

    ``record`` (``rundir.hydra_record``) is written into ``run_dir/.hydra`` once the run is
    accepted: checked, its directory locked, and any checkpoint there of the same run.
    A stop signal before training (e.g. while the teacher is evaluated) or after it ends in
    ``Interrupted`` at once; during training the loop finishes its iteration and checkpoints.
    """
    started = time.perf_counter()
    hydra_dir, record = run_dir, record or {}
    try:
        with stop_on_signals(raise_signal_received):  # before any work
            check_resolvable(cfg)
            redact_secrets(cfg)
            name_teacher_after_its_file(cfg)
            validate(cfg)
            if cfg.runtime.get("check_teacher_dataset", True):
                check_trained_on(cfg.teacher.checkpoint, cfg.dataset.name, cfg.teacher.name)
            device = resolve_device(str(cfg.runtime.device))
            run_dir = run_directory(cfg, run_dir)
            lock(run_dir)
            remove_stale_temporaries(run_dir)  # left by a process killed mid-write
            try:
                return run(
                    cfg, run_dir, device, started, lambda: save_hydra_record(hydra_dir, record)
                )
            finally:
                unlock(run_dir)
    except SignalReceived as received:
        raise stopped_outside_training(str(received), run_dir) from None


def finished_results(run_dir: Path) -> dict[str, Any] | None:
    """``results.json`` of a run whose checkpoint is final, or None when it is missing or
    cannot be trusted (cut short, damaged, edited: warned): the final checkpoint rebuilds it."""
    path = run_dir / schema.RESULTS_FILE
    if not path.exists():
        return None
    try:
        return load_results(run_dir)
    except (OSError, ValueError) as error:
        log.warning(f"{path} is unreadable ({error}); rebuilding it from the final checkpoint")
        return None


def stopped_outside_training(signal_name: str, run_dir: Path) -> Interrupted:
    """What a stop signal outside the training loop leaves, and how to go on."""
    if (run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists():
        kept = f"the last checkpoint in {run_dir} is kept; re-run the same command to resume"
    else:
        kept = "nothing was checkpointed yet; re-run the same command to start the run"
    return Interrupted(f"{signal_name} received outside the training loop; {kept}.", signal_name)


def run(
    cfg: DictConfig,
    run_dir: Path,
    device: torch.device,
    started: float,
    accepted: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The job in its locked run directory: resume or start, train, write the results;
    ``accepted()`` once the settings are known to be this directory's run's (or it has none)."""
    # Built before any work: their constructors reject bad settings (e.g. selection.threshold).
    build(cfg.selection), build(cfg.method)
    identity = run_identity(cfg, teacher_sha256(cfg.teacher.checkpoint))
    saved = load_checkpoint(run_dir, CHECKPOINT_KEYS)
    if saved is not None:
        check_same_run(saved[0]["identity"], identity, saved[1])
    accepted()
    if saved is not None:
        finished = saved[0]["distiller"]["epoch"] >= int(cfg.trainer.epochs)
        results = finished_results(run_dir) if finished else None
        if results is not None:
            log.info(f"the run in {run_dir} is already finished; nothing to do")
            print_done(results, run_dir)
            return results
    threads = set_threads(cfg.runtime.threads)
    seed_everything(int(cfg.seed))
    teacher: Teacher = build(cfg.teacher)  # after seeding: building it draws initial weights
    test_loader = load_test_set(cfg, teacher)
    distiller = build_distiller(cfg, teacher, device)
    teacher_acc = (
        evaluate(distiller.teacher, test_loader, device) if test_loader is not None else None
    )
    log.info(f"teacher {teacher.name} ({teacher.arch}): test accuracy {percent(teacher_acc)}")
    run_id = saved[0]["wandb_run_id"] if saved is not None else None
    tracker = open_tracker(cfg, distiller, run_dir, device, threads, run_id)
    if saved is None:
        tracker.log({schema.TEACHER_ACC: teacher_acc}, step=0)
    else:
        resume(distiller, *saved)
    tracker.summary({schema.TEACHER_ACC_FIELD: teacher_acc})
    try:
        accuracies = train(cfg, distiller, tracker, identity, run_dir, test_loader)
        student_file = save_student(run_dir, distiller.student)
        results = {
            **summarise(accuracies, teacher_acc),
            schema.EPOCH_ACCS: accuracies,
            **labels(cfg, teacher, distiller, device),
            schema.WALL_TIME: time.perf_counter() - started,
            "wandb_run_id": tracker.run_id,
            schema.HISTORY: distiller.history,
        }
        save_results(run_dir, results)
        summary_fields = (schema.EPOCH_ACCS, schema.HISTORY)
        tracker.summary({k: v for k, v in results.items() if k not in summary_fields})
        tracker.log_model(student_file, model_metadata(results, identity, tracker, run_dir))
    except BaseException as error:
        # the dashboard shows a stopped job as not finished: failed, or preempted by a signal
        preempted = isinstance(error, Interrupted | SignalReceived)
        tracker.finish(exit_code=exit_code(error), preempted=preempted)
        raise
    tracker.finish()
    print_done(results, run_dir)
    return results


def open_tracker(
    cfg: DictConfig,
    distiller: Distiller,
    run_dir: Path,
    device: torch.device,
    threads: int,
    run_id: str | None,
):
    """The run's tracker (``logger``), its config holding the values ``auto`` resolved to on
    this machine (what a dashboard user filters on); ``run_id`` continues a resumed W&B run."""
    resolved = {
        "runtime.device": str(device),
        "runtime.threads": threads,
        "speed.precision": distiller.precision.name,
    }
    # The run's config and overrides are data for the tracker, given to its class by hand:
    # through instantiate they would be config again, their ${...} text resolved.
    tracker = build(cfg.logger, _partial_=True, _convert_="all")
    return tracker(
        directory=run_dir,
        run_config=dashboard_config(
            OmegaConf.to_container(cfg, resolve=True), resolved, command_line_overrides(), run_dir
        ),
        name=run_name(cfg),
        group=run_group(cfg),
        tags=[cfg.dataset.name, cfg.teacher.name, cfg.student.arch, cfg.method.name],
        run_id=run_id,
    )


def labels(
    cfg: DictConfig, teacher: Teacher, distiller: Distiller, device: torch.device
) -> dict[str, Any]:
    """What ``results.json`` says the run was (``schema.LABEL_FIELDS`` and a few more)."""
    return {
        "dataset": cfg.dataset.name,
        "teacher": teacher.name,
        "teacher_arch": teacher.arch,
        "teacher_sha256": teacher.sha256,
        "student": cfg.student.arch,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "epochs": distiller.schedule.epochs,
        "device": str(device),
        "commit": source_commit(),
    }


def model_metadata(
    results: dict[str, Any], identity: dict[str, Any], tracker, run_dir: Path
) -> dict[str, Any]:
    """What the W&B model artifact of ``student.pt`` says it is: the run's labels (the teacher's
    name, architecture and sha256 among them) and accuracies, W&B run, run directory and the
    settings that define the run (``config.run_identity``)."""
    shown = (*schema.LABEL_FIELDS, "teacher_sha256", *schema.ACCURACY_FIELDS)
    return {
        **{key: results[key] for key in shown},
        schema.TEACHER_ACC_FIELD: results[schema.TEACHER_ACC_FIELD],
        "wandb_run_id": tracker.run_id,
        "run_dir": str(run_dir),
        "identity": identity,
    }


def resume(distiller: Distiller, state: dict[str, Any], path: Path) -> None:
    """Continue ``distiller`` from the checkpoint ``state`` read from ``path``."""
    distiller.load_state_dict(state["distiller"])
    set_rng_state(state["rng"])
    schedule = distiller.schedule
    log.info(
        f"resuming from {path}: {distiller.epoch} of {schedule.epochs} epochs and "
        f"{distiller.iteration} of {schedule.iters_per_epoch} iterations of the next done"
    )


def train(
    cfg: DictConfig,
    distiller: Distiller,
    tracker,
    identity: dict[str, Any],
    run_dir: Path,
    test_loader,
) -> list[float | None]:
    """``distiller.fit`` with a checkpoint after every epoch and on a stop signal; a stop
    signal ends in ``Interrupted`` and a non-finite loss in ``NonFiniteLoss``, each saying how
    to go on. Returns the per-epoch test accuracies."""

    def checkpoint() -> None:  # the keys of CHECKPOINT_KEYS
        save_checkpoint(
            run_dir,
            {
                "identity": identity,
                "distiller": distiller.state_dict(),
                "rng": rng_state(),
                "wandb_run_id": tracker.run_id,
            },
        )

    def finish_iteration_then_stop(signal_name: str) -> None:
        log.info(f"{signal_name} received: finishing the current iteration, then checkpointing")
        distiller.request_stop(signal_name)

    reporter = EpochReporter(
        tracker,
        run_dir,
        distiller.schedule.epochs,
        int(cfg.runtime.image_every),
        distiller.synthesizer.generate,
        distiller.teacher_classes,
    )
    try:
        with stop_on_signals(finish_iteration_then_stop):
            accuracies = distiller.fit(
                test_loader, reporter, bool(cfg.runtime.progress), on_checkpoint=checkpoint
            )
    except NonFiniteLoss as error:
        tracker.log({schema.NONFINITE_STOPPED: 1.0}, step=distiller.epoch + 1)
        tracker.summary({"stopped": str(error)})
        raise nonfinite_advice(error, run_dir) from None
    except RuntimeError as error:  # torch.OutOfMemoryError on CUDA, a RuntimeError on the CPU
        if not out_of_memory(error):
            raise
        raise UserError(
            f"out of memory at trainer.batch_size={cfg.trainer.batch_size}; lower it (or use "
            "a device with more memory)."
        ) from None
    if not distiller.finished:
        schedule = distiller.schedule
        raise Interrupted(
            f"{distiller.stop_reason} received; checkpoint saved after {distiller.epoch} of "
            f"{schedule.epochs} epochs and {distiller.iteration} iterations of the next in "
            f"{run_dir}; re-run the same command to resume.",
            distiller.stop_reason,
        )
    return accuracies


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


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure of torch (CUDA or CPU)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
