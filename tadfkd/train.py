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

from tadfkd.data import DATASETS, load_split, make_loader
from tadfkd.distill import Distiller, Schedule, evaluate
from tadfkd.errors import DatasetMissing, UserError
from tadfkd.teachers import Teacher
from tadfkd.views import Views

LAST_K = 10  # student_last10_acc averages this many final evaluations


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


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then rename)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one distillation job; returns the contents of ``results.json`` (also written)."""
    started = time.perf_counter()
    name_teacher_after_its_file(cfg)
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))

    teacher: Teacher = build(cfg.teacher)
    test_loader = load_test_set(cfg, teacher)
    teacher_model = teacher.model.to(device)
    student = build(cfg.student).to(device)
    generator = build(cfg.generator).to(device)
    teacher_acc = evaluate(teacher_model, test_loader, device) if test_loader is not None else None
    print(f"teacher {teacher.name} ({teacher.arch}): test accuracy {percent(teacher_acc)}")

    schedule = Schedule(
        epochs=int(cfg.trainer.epochs),
        iters_per_epoch=int(cfg.trainer.iters_per_epoch),
        student_steps=int(cfg.trainer.student_steps),
        batch_size=int(cfg.trainer.batch_size),
        nz=int(cfg.generator.nz),
        published_scheduler_offset=bool(cfg.trainer.published_scheduler_offset),
    )
    student_optimizer = build(cfg.optimizer.student)(student.parameters())
    distiller = Distiller(
        teacher=teacher_model,
        student=student,
        generator=generator,
        views=Views(teacher.mean, teacher.std, int(cfg.dataset.crop_padding), cfg.dataset.flip),
        selection=build(cfg.selection),
        objective=build(cfg.method),
        student_optimizer=student_optimizer,
        generator_optimizer=build(cfg.optimizer.generator)(generator.parameters()),
        scheduler=build(cfg.optimizer.scheduler)(student_optimizer),
        schedule=schedule,
        device=device,
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
    )
    tracker.log({"acc/teacher": teacher_acc}, step=0)
    image_every = int(cfg.trainer.image_every)
    history: list[dict[str, float]] = []  # every epoch's metrics, for results.json

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log(metrics, step=epoch + 1)
        history.append({"epoch": epoch + 1, **metrics})
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
        accuracies = distiller.fit(test_loader, on_epoch_end, progress=cfg.trainer.progress)
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
            "history": history,
        }
        write_json(run_dir / "results.json", results)
        tracker.summary({k: v for k, v in results.items() if k not in ("epoch_accs", "history")})
    finally:
        tracker.finish()
    if test_loader is None:
        print(
            "done: trained without a test set, so no accuracy was measured (null in "
            f"results.json); results in {run_dir / 'results.json'}"
        )
        return results
    print(
        f"done: student final test accuracy {100 * results['student_final_acc']:.2f}% "
        f"(mean of last {min(LAST_K, len(accuracies))} epochs "
        f"{100 * results['student_last10_acc']:.2f}%, best epoch "
        f"{100 * results['student_best_acc']:.2f}% [test-set selection]); teacher "
        f"{100 * teacher_acc:.2f}%; results in {run_dir / 'results.json'}"
    )
    return results
