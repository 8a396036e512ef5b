"""The distillation job behind ``run.py``: build everything from the composed config, train,
write ``results.json``, log to W&B.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from tadfkd.checkpoint import (
    LATEST,
    PREVIOUS,
    ensure_writable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_on_signals,
)
from tadfkd.data import DATASETS, load_split, make_loader
from tadfkd.distill import Distiller, Schedule, evaluate
from tadfkd.errors import DatasetMissing, Interrupted, NonFiniteLoss, UserError
from tadfkd.files import replace_atomically, write_json
from tadfkd.precision import Precision, prepare_model, resolve_precision
from tadfkd.teachers import Teacher
from tadfkd.views import Views

LAST_K = 10  # student_last10_acc averages this many final evaluations
# Settings that may change between a run and its resumption (they do not change what is
# computed); any other difference means another experiment, which needs its own run directory.
RESUME_MAY_CHANGE = (
    "hydra",
    "resume",
    "device",
    "paths",
    "logger",
    "dataset.root",
    "dataset.download",
    "teacher.checkpoint",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.eval_batch_size",
    "trainer.image_every",
    "trainer.on_nonfinite",
)


def build(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, passing a ``UserError`` raised while building through as is."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but no CUDA device is available; use cpu.")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise UserError(f"device={name} is not a device name; use auto, cpu or cuda.") from error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(cfg: DictConfig) -> None:
    """Reject values that cannot work, before any work is done (one sentence each)."""
    trainer = cfg.trainer
    for key in ("epochs", "iters_per_epoch", "student_steps", "eval_batch_size"):
        if int(trainer[key]) < 1:
            raise UserError(f"trainer.{key}={trainer[key]} must be a positive integer.")
    if int(trainer.batch_size) < 2:
        raise UserError(
            f"trainer.batch_size={trainer.batch_size} must be at least 2 "
            "(the mixture and the batch statistics need two samples)."
        )
    for group in ("student", "generator"):
        lr = float(cfg.optimizer[group].lr)
        if not lr > 0:
            raise UserError(f"optimizer.{group}.lr={lr} must be positive.")
    if cfg.dataset.name not in DATASETS:
        raise UserError(f"dataset.name={cfg.dataset.name} is unknown; use one of {list(DATASETS)}.")
    if int(cfg.dataset.image_size) % 4:
        raise UserError(
            f"dataset.image_size={cfg.dataset.image_size} is not divisible by 4, "
            "which the generator's two 2x upsamplings need."
        )
    if int(cfg.teacher.num_classes) != int(cfg.dataset.num_classes):
        raise UserError(
            f"teacher {cfg.teacher.name} has {cfg.teacher.num_classes} classes but dataset "
            f"{cfg.dataset.name} has {cfg.dataset.num_classes}; pick a matching teacher."
        )
    student_classes = cfg.student.get("num_classes")
    if student_classes is not None and int(student_classes) != int(cfg.teacher.num_classes):
        raise UserError(
            f"student {cfg.student.arch} has {student_classes} classes but teacher "
            f"{cfg.teacher.name} has {cfg.teacher.num_classes}; leave student.num_classes unset."
        )
    if trainer.on_nonfinite not in ("stop", "skip"):
        raise UserError(
            f"trainer.on_nonfinite={trainer.on_nonfinite} is unknown; use stop or skip."
        )


def name_teacher_after_its_file(cfg: DictConfig) -> None:
    """Name a teacher given as ``teacher.checkpoint=... teacher.arch=...`` on the command line
    after its file (unless ``teacher.name=`` is given too): the option's name is another
    network's."""
    if not HydraConfig.initialized():
        return
    keys = {item.split("=", 1)[0].lstrip("+~") for item in HydraConfig.get().overrides.task}
    if {"teacher.checkpoint", "teacher.arch"} <= keys and "teacher.name" not in keys:
        cfg.teacher.name = Path(cfg.teacher.checkpoint).stem


def run_name(cfg: DictConfig) -> str:
    """Readable run name, e.g. ``tadfkd-resnet18@cifar10_resnet34_9546-s0``."""
    return f"{cfg.method.name}-{cfg.student.arch}@{cfg.teacher.name}-s{cfg.seed}"


def run_group(cfg: DictConfig) -> str | None:
    """W&B group: ``logger.group`` when set, else the sweep directory's name in a multirun (so
    that every job of one sweep shares it), else none."""
    group = OmegaConf.select(cfg, "logger.group")
    if group:
        return str(group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def summarise(accuracies: list[float | None], teacher_acc: float | None) -> dict[str, Any]:
    """Final, best-epoch (test-set selection) and last-10 mean accuracy, as fractions; None
    where nothing was measured (no test set)."""
    measured = [accuracy for accuracy in accuracies if accuracy is not None]
    return {
        "student_final_acc": measured[-1] if measured else None,
        "student_best_acc": max(measured, default=None),
        "student_last10_acc": float(np.mean(measured[-LAST_K:])) if measured else None,
        "teacher_acc": teacher_acc,
    }


def percent(fraction: float | None) -> str:
    """A fraction as a percentage with two decimals, or "not measured" for None."""
    return "not measured" if fraction is None else f"{100 * fraction:.2f}%"


def load_test_set(cfg: DictConfig, teacher: Teacher) -> DataLoader | None:
    """The test set normalised for ``teacher``, in batches; None (after one note) when it is
    absent and ``dataset.require_test_set`` is false, else its absence is a ``UserError``."""
    try:
        test_set = load_split(
            cfg.dataset.name,
            cfg.dataset.root,
            "test",
            mean=teacher.mean,
            std=teacher.std,
            download=bool(cfg.dataset.download),
        )
    except DatasetMissing as error:
        if cfg.dataset.get("require_test_set", True):
            raise
        print(
            f"note: {error} Training without evaluation (dataset.require_test_set=false): "
            "teacher and student accuracies are not measured and are null in results.json."
        )
        return None
    return make_loader(
        test_set,
        int(cfg.trainer.eval_batch_size),
        shuffle=False,
        num_workers=int(cfg.trainer.num_workers),
    )


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that define what a run computes, flattened to ``a.b.c`` keys."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    for key in cfg:  # group by group, so that the hydra node (in tests) is never resolved
        if key not in RESUME_MAY_CHANGE:
            node = cfg[key]
            walk(
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node,
                f"{key}.",
            )
    return {
        key: value
        for key, value in flat.items()
        if not any(key == ignored or key.startswith(ignored + ".") for ignored in RESUME_MAY_CHANGE)
    }


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` with settings that compute something else."""
    differing = sorted(
        key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key)
    )
    if differing:
        shown = ", ".join(f"{key}={saved.get(key)!r} there" for key in differing[:3])
        raise UserError(
            f"{path} was written by a run with other settings ({shown}); re-run with the same "
            "overrides to resume it, or pick a new hydra.run.dir for a new run."
        )


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """Save ``model``'s state dict (CPU tensors, no ``torch.compile`` prefix) atomically."""
    model = getattr(model, "_orig_mod", model)
    state_dict = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    replace_atomically(path, lambda temporary: torch.save(state_dict, temporary))


def print_done(results: dict[str, Any], run_dir: Path) -> None:
    """The closing line of a run: its accuracies and where ``results.json`` is."""
    if results["student_final_acc"] is None:
        print(
            "done: trained without a test set, so no accuracy was measured (null in "
            f"results.json); results in {run_dir / 'results.json'}"
        )
        return
    print(
        f"done: student final test accuracy {100 * results['student_final_acc']:.2f}% "
        f"(mean of last {min(LAST_K, len(results['epoch_accs']))} epochs "
        f"{100 * results['student_last10_acc']:.2f}%, best epoch "
        f"{100 * results['student_best_acc']:.2f}% [test-set selection]); teacher "
        f"{percent(results['teacher_acc'])}; results in {run_dir / 'results.json'}"
    )


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one distillation job; returns the contents of ``results.json`` (also written)."""
    started = time.perf_counter()
    name_teacher_after_its_file(cfg)
    validate(cfg)
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        if not ((run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists()):
            raise UserError(
                f"resume={run_dir} holds no {LATEST}; give the run directory to resume."
            )
    ensure_writable(run_dir)
    # Built before any work: their constructors reject bad settings (e.g. selection.threshold).
    selection, objective = build(cfg.selection), build(cfg.method)
    identity = run_identity(cfg)
    saved = load_checkpoint(run_dir)
    if saved is not None:
        state, saved_path = saved
        check_same_run(state["identity"], identity, saved_path)
        if (
            state["distiller"]["epoch"] >= int(cfg.trainer.epochs)
            and (run_dir / "results.json").exists()
        ):
            results = json.loads((run_dir / "results.json").read_text())
            print(f"the run in {run_dir} is already finished; nothing to do")
            print_done(results, run_dir)
            return results
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))

    teacher: Teacher = build(cfg.teacher)
    test_loader = load_test_set(cfg, teacher)
    precision = Precision(resolve_precision(str(cfg.precision), device), device)
    compile_models = bool(cfg.compile)
    teacher_model = prepare_model(teacher.model, device, compile_models)
    student = prepare_model(build(cfg.student), device, compile_models)
    generator = prepare_model(build(cfg.generator), device, compile_models)
    teacher_acc = evaluate(teacher_model, test_loader, device) if test_loader is not None else None
    print(f"teacher {teacher.name} ({teacher.arch}): test accuracy {percent(teacher_acc)}")

    schedule = Schedule(
        epochs=int(cfg.trainer.epochs),
        iters_per_epoch=int(cfg.trainer.iters_per_epoch),
        student_steps=int(cfg.trainer.student_steps),
        batch_size=int(cfg.trainer.batch_size),
        nz=int(cfg.generator.nz),
        published_scheduler_offset=bool(cfg.trainer.published_scheduler_offset),
        on_nonfinite=str(cfg.trainer.on_nonfinite),
    )
    student_optimizer = build(cfg.optimizer.student)(student.parameters())
    distiller = Distiller(
        teacher=teacher_model,
        student=student,
        generator=generator,
        views=Views(teacher.mean, teacher.std, int(cfg.dataset.crop_padding), cfg.dataset.flip),
        selection=selection,
        objective=objective,
        student_optimizer=student_optimizer,
        generator_optimizer=build(cfg.optimizer.generator)(generator.parameters()),
        scheduler=build(cfg.optimizer.scheduler)(student_optimizer),
        schedule=schedule,
        device=device,
        precision=precision,
    )

    resolved = OmegaConf.to_container(cfg, resolve=True)
    # Not recursive: the run's config (full of _target_ keys) is data for the tracker here.
    tracker = build(
        cfg.logger,
        _recursive_=False,
        _convert_="all",
        directory=run_dir,
        run_config=resolved,
        name=run_name(cfg),
        group=run_group(cfg),
        tags=[cfg.dataset.name, cfg.teacher.name, cfg.student.arch, cfg.method.name],
        run_id=state["wandb_run_id"] if saved is not None else None,
    )
    if saved is None:
        tracker.log({"acc/teacher": teacher_acc}, step=0)
    else:
        distiller.load_state_dict(state["distiller"])
        set_rng_state(state["rng"])
        print(
            f"resuming from {saved_path}: {distiller.epoch} of {schedule.epochs} epochs and "
            f"{distiller.iteration} of {schedule.iters_per_epoch} iterations of the next done",
            flush=True,
        )
    image_every = int(cfg.trainer.image_every)

    def checkpoint() -> None:
        save_checkpoint(
            run_dir,
            {
                "identity": identity,
                "distiller": distiller.state_dict(),
                "rng": rng_state(),
                "wandb_run_id": tracker.run_id,
            },
        )

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log(metrics, step=epoch + 1)
        print(
            f"epoch {epoch + 1}/{schedule.epochs}: student test accuracy "
            f"{percent(metrics['acc/student'])}, selection rate "
            f"{100 * metrics['selection/rate']:.1f}%, student loss "
            f"{metrics.get('loss/student', float('nan')):.4f}, "
            f"teacher-student agreement {100 * metrics['health/agreement']:.1f}% "
            f"({metrics['time/epoch_s']:.1f} s)",
            flush=True,
        )
        if image_every and ((epoch + 1) % image_every == 0 or epoch + 1 == schedule.epochs):
            with torch.no_grad():
                grid = make_grid(distiller.generate(64).float().cpu(), nrow=8)
            save_image(grid, run_dir / f"samples_epoch{epoch + 1:04d}.png")
            tracker.log_images("samples", grid, step=epoch + 1)

    try:
        try:
            with stop_on_signals(distiller.request_stop):
                accuracies = distiller.fit(
                    test_loader, on_epoch_end, cfg.trainer.progress, on_checkpoint=checkpoint
                )
        except NonFiniteLoss as error:
            tracker.log({"nonfinite/stopped": 1.0}, step=distiller.epoch + 1)
            tracker.summary({"stopped": str(error)})
            kept = (
                f"the last good checkpoint is kept in {run_dir}"
                if (run_dir / LATEST).exists()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLoss(
                f"{error}; {kept}; re-run with trainer.on_nonfinite=skip to skip such steps, or "
                "lower the learning rates in a new run directory."
            ) from None
        if not distiller.finished:
            raise Interrupted(
                f"{distiller.stop_reason} received; checkpoint saved after {distiller.epoch} of "
                f"{schedule.epochs} epochs and {distiller.iteration} iterations of the next in "
                f"{run_dir}; re-run the same command to resume."
            )
        save_weights(run_dir / "student.pt", student)
        results = {
            **summarise(accuracies, teacher_acc),
            "epoch_accs": accuracies,
            "dataset": cfg.dataset.name,
            "teacher": teacher.name,
            "teacher_arch": teacher.arch,
            "student": cfg.student.arch,
            "method": cfg.method.name,
            "seed": int(cfg.seed),
            "epochs": schedule.epochs,
            "device": str(device),
            "wall_time_s": time.perf_counter() - started,
            "wandb_run_id": tracker.run_id,
            "history": distiller.history,
        }
        write_json(run_dir / "results.json", results)
        tracker.summary({k: v for k, v in results.items() if k not in ("epoch_accs", "history")})
    finally:
        tracker.finish()
    print_done(results, run_dir)
    return results
