"""The distillation job behind ``run.py``: check the config, build the run, resume it if a
checkpoint is there (``resume``), train with an epoch reporter, write the results and track
them (``tracking``). What Hydra knows about the job comes in as a ``JobContext``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tadfkd.base import schema
from tadfkd.base.errors import NonFiniteLoss, SignalReceived, UserError
from tadfkd.base.files import remove_stale_temporaries
from tadfkd.distillation.evaluation import evaluate
from tadfkd.distillation.loop import Distiller
from tadfkd.run.builder import build_distiller, load_test_set
from tadfkd.run.checkpoint import raise_signal_received, stop_on_signals
from tadfkd.run.checks import run_identity, validate
from tadfkd.run.context import JobContext
from tadfkd.run.reporter import EpochReporter
from tadfkd.run.results import percent, print_done, save_results, save_student, summarise
from tadfkd.run.resume import (
    Saved,
    finished_results,
    load_saved,
    nonfinite_advice,
    restore,
    run_directory,
    save_job_checkpoint,
    stopped_in_training,
    stopped_outside_training,
)
from tadfkd.run.rundir import lock, save_hydra_record, unlock
from tadfkd.run.runtime import (
    build,
    check_resolvable,
    keep_freed_memory,
    redact_secrets,
    resolve_device,
    seed_everything,
    set_threads,
    source_commit,
)
from tadfkd.run.tracking import finishing, model_metadata, open_tracker
from tadfkd.teachers.loading import Teacher, check_trained_on, teacher_sha256

log = logging.getLogger(__name__)


def name_teacher_after_its_file(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Name a teacher given as ``teacher.checkpoint=... teacher.arch=...`` on the command line
    (``overrides``) after its file (unless ``teacher.name=`` is given too): the option's name
    is another network's."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
    if {"teacher.checkpoint", "teacher.arch"} <= keys and "teacher.name" not in keys:
        cfg.teacher.name = Path(cfg.teacher.checkpoint).stem


def prepare(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Complete and check ``cfg`` before any work: every value resolvable, no secret in it,
    every value in range, a teacher of the dataset."""
    check_resolvable(cfg)
    redact_secrets(cfg)
    name_teacher_after_its_file(cfg, overrides)
    validate(cfg)
    if cfg.runtime.get("check_teacher_dataset", True):
        check_trained_on(cfg.teacher.checkpoint, cfg.dataset.name, cfg.teacher.name)


def distil(cfg: DictConfig, context: JobContext) -> dict[str, Any]:
    """Run one distillation job; returns the contents of ``results.json`` (also written).

    ``context.record`` is written into ``context.run_dir/.hydra`` once the run is accepted:
    checked, its directory locked, and any checkpoint there of the same run.
    A stop signal before training (e.g. while the teacher is evaluated) or after it ends in
    ``Interrupted`` at once; during training the loop finishes its iteration and checkpoints.
    """
    started = time.perf_counter()
    run_dir = context.run_dir
    try:
        with stop_on_signals(raise_signal_received):  # before any work
            prepare(cfg, context.overrides)
            device = resolve_device(str(cfg.runtime.device))
            run_dir = run_directory(cfg, run_dir)
            lock(run_dir)
            remove_stale_temporaries(run_dir)  # left by a process killed mid-write
            try:
                return run(cfg, context, run_dir, device, started)
            finally:
                unlock(run_dir)
    except SignalReceived as received:
        raise stopped_outside_training(str(received), run_dir) from None


def run(
    cfg: DictConfig, context: JobContext, run_dir: Path, device: torch.device, started: float
) -> dict[str, Any]:
    """The job in its locked run directory: resume or start, train, write the results; the
    Hydra record is written once the settings are known to be this directory's run's (or it
    has none)."""
    # Built before any work: their constructors reject bad settings (e.g. selection.threshold).
    build(cfg.selection), build(cfg.method)
    identity = run_identity(cfg, teacher_sha256(cfg.teacher.checkpoint))
    saved = load_saved(run_dir, identity)
    save_hydra_record(context.run_dir, context.record)
    results = finished_results(saved, int(cfg.trainer.epochs), run_dir)
    if results is not None:
        log.info(f"the run in {run_dir} is already finished; nothing to do")
    else:
        results = train_and_record(cfg, context, run_dir, device, saved, identity, started)
    print_done(results, run_dir)
    return results


def train_and_record(
    cfg: DictConfig,
    context: JobContext,
    run_dir: Path,
    device: torch.device,
    saved: Saved | None,
    identity: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Build the run, continue it from ``saved`` (or start it), train it to its end and write
    and track its results."""
    threads = set_threads(cfg.runtime.threads, context.side_by_side)
    keep_freed_memory(cfg.runtime.get("keep_freed_memory", True))
    seed_everything(int(cfg.seed))
    teacher: Teacher = build(cfg.teacher)  # after seeding: building it draws initial weights
    test_loader = load_test_set(cfg, teacher)
    distiller = build_distiller(cfg, teacher, device)
    teacher_acc = (
        evaluate(distiller.teacher, test_loader, device) if test_loader is not None else None
    )
    log.info(f"teacher {teacher.name} ({teacher.arch}): test accuracy {percent(teacher_acc)}")
    resolved = {  # what ``auto`` resolved to on this machine
        "runtime.device": str(device),
        "runtime.threads": threads,
        "speed.precision": distiller.precision.name,
        "speed.refill": "adaptive" if distiller.synthesizer.adaptive_rounds else "single",
    }
    run_id = saved[0]["wandb_run_id"] if saved is not None else None
    tracker = open_tracker(cfg, context, run_dir, resolved, run_id)
    if saved is None:
        tracker.log({schema.TEACHER_ACC: teacher_acc}, step=0)
    else:
        restore(distiller, saved)
    tracker.summary({schema.TEACHER_ACC_FIELD: teacher_acc})
    with finishing(tracker):
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
        tracker.log_model(student_file, model_metadata(results, identity, run_dir))
    return results


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

    def checkpoint() -> None:
        save_job_checkpoint(run_dir, identity, distiller, tracker.run_id)

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
        raise stopped_in_training(distiller, run_dir)
    return accuracies


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure of torch (CUDA or CPU)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
