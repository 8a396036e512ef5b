"""Teacher job: ``python -m tadfkd.train_teacher [overrides]`` trains ``teacher.arch`` on the real
training set with the recipe of ``conf/recipe/`` and saves it (see :func:`output_path`) with a
metadata file (architecture, classes, normalisation, recipe, seed, test accuracy, hash).

Training on the CPU with a fixed seed is deterministic: the same command writes the same
weights and reports the same test accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from tadfkd.base.errors import UserError
from tadfkd.base.files import probe_writable, reason, write_json
from tadfkd.data.loading import Augmentation, load_split, make_loader
from tadfkd.distillation.evaluation import evaluate
from tadfkd.models import build_classifier
from tadfkd.run.checks import validate
from tadfkd.run.context import JobContext
from tadfkd.run.rundir import save_hydra_record
from tadfkd.run.runtime import (
    build,
    keep_freed_memory,
    resolve_device,
    seed_everything,
    set_threads,
)
from tadfkd.teachers.loading import save_teacher

# Command-line overrides that change the trained teacher, and so name its file.
_VARIANT_KEYS = ("seed", "teacher.arch", "recipe.")


def output_path(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """The file the trained teacher is written to: ``output`` when set; otherwise the teacher
    option's ``teacher.checkpoint``, named after ``teacher.arch`` when the command line
    (``overrides``) sets it, and extended by ``_<key><value>`` for each override of ``seed`` or
    ``recipe.*`` (dots in values written as ``p``).

    E.g. ``teacher=digits_cnn seed=1 recipe.label_smoothing=0.1`` writes
    ``<teachers>/digits/digits_cnn_seed1_label_smoothing0p1.pt`` and ``teacher.arch=vgg11
    seed=2`` writes ``vgg11_seed2.pt`` beside the option's file, so every job of a sweep gets
    its own file and the option itself keeps its own.
    """
    if cfg.output:
        return Path(cfg.output)
    checkpoint = Path(cfg.teacher.checkpoint)
    parts = [checkpoint.stem]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "teacher.arch" and value:
            parts[0] = value
        elif key.startswith(_VARIANT_KEYS) and value:
            parts.append(f"{key.rpartition('.')[2]}{value.replace('.', 'p')}")
    return checkpoint.with_name("_".join(parts) + checkpoint.suffix)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any training, an output that exists (unless ``overwrite``) or that cannot
    be written: a directory, a path under a file, a read-only folder. Both files the job writes
    count: the weights at ``path`` and the metadata beside it (``path`` with suffix ``.json``),
    whatever the spelling or suffix of ``path``."""
    metadata = path.with_suffix(".json")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; set output=/path/to/teacher.pt.")
    if path == metadata:
        raise UserError(
            f"output {path} is where the teacher's metadata goes; set output=/path/to/teacher.pt."
        )
    for kind, file in (("teacher file", path), ("teacher metadata", metadata)):
        if (file.exists() or file.is_symlink()) and not overwrite:
            raise UserError(
                f"{kind} {file} exists already; pick a new output=/path.pt, or set "
                "overwrite=true to replace it."
            )
    if metadata.is_dir():
        raise UserError(f"teacher metadata {metadata} is a directory; pick a new output=/path.pt.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(path.parent)
    except OSError as error:
        raise UserError(
            f"output {path} cannot be written ({reason(error)}); set output= to a path in a folder "
            "you can write to."
        ) from None


def loaders(cfg: DictConfig) -> tuple[DataLoader, DataLoader]:
    """The real training split (augmented per the dataset and the recipe, shuffled by the
    seed) and the test split, normalised with the teacher's constants."""
    teacher, recipe = cfg.teacher, cfg.recipe
    augmentation = Augmentation(
        int(cfg.dataset.augmentation.crop_padding),
        bool(cfg.dataset.augmentation.flip),
        float(recipe.erase),
    )
    source = build(cfg.dataset.source)
    splits = {
        split: load_split(
            source,
            split,
            mean=teacher.mean,
            std=teacher.std,
            augmentation=augmentation if split == "train" and bool(recipe.augment) else None,
            download=bool(cfg.runtime.download),
        )
        for split in ("train", "test")
    }
    workers = int(cfg.runtime.num_workers)
    train = make_loader(
        splits["train"], int(recipe.batch_size), True, num_workers=workers, seed=int(cfg.seed)
    )
    return train, make_loader(splits["test"], 1024, shuffle=False, num_workers=workers)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    recipe: DictConfig,
    device: torch.device,
) -> float:
    """SGD with momentum and cosine annealing for ``recipe.epochs`` epochs, a line per epoch;
    returns the final test accuracy (a fraction)."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=float(recipe.lr),
        momentum=float(recipe.momentum),
        weight_decay=float(recipe.weight_decay),
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(recipe.epochs))
    for epoch in range(int(recipe.epochs)):
        model.train()
        total_loss = torch.zeros((), device=device)
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(
                model(images), labels, label_smoothing=float(recipe.label_smoothing)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
        scheduler.step()
        accuracy = evaluate(model, test_loader, device)
        print(
            f"epoch {epoch + 1}/{recipe.epochs}: train loss "
            f"{float(total_loss) / len(train_loader):.4f}, test accuracy {100 * accuracy:.2f}%",
            flush=True,
        )
    return accuracy


def train_teacher(cfg: DictConfig, context: JobContext, output: Path | None = None) -> dict:
    """Train one teacher and save it to ``output`` (default: ``teacher.checkpoint``); returns
    its metadata (test accuracy as a fraction; the command line that trained it, from
    ``context.overrides``, is recorded). ``context.record`` goes into ``context.run_dir/.hydra``
    once every value and the output are checked."""
    validate(cfg)
    checkpoint = output or Path(cfg.teacher.checkpoint)
    check_output(checkpoint, bool(cfg.overwrite))
    save_hydra_record(context.run_dir, context.record)
    started = time.perf_counter()
    # Reductions split over threads add in another order: fix the count to fix the result.
    set_threads(cfg.runtime.threads, context.side_by_side)
    keep_freed_memory(cfg.runtime.get("keep_freed_memory", True))
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.runtime.device))
    teacher = cfg.teacher
    train_loader, test_loader = loaders(cfg)
    model = build_classifier(teacher.arch, int(teacher.num_classes), int(teacher.in_channels))
    accuracy = fit(model.to(device), train_loader, test_loader, cfg.recipe, device)
    metadata = {
        "name": checkpoint.stem,
        "arch": teacher.arch,
        "dataset": cfg.dataset.name,
        "num_classes": int(teacher.num_classes),
        "in_channels": int(teacher.in_channels),
        "mean": list(teacher.mean),
        "std": list(teacher.std),
        "recipe": OmegaConf.to_container(cfg.recipe, resolve=True),
        "seed": int(cfg.seed),
        "threads": torch.get_num_threads(),
        "test_acc": accuracy,
        "train_time_s": time.perf_counter() - started,
        "command": " ".join(["python -m tadfkd.train_teacher", *context.overrides]),
    }
    metadata = save_teacher(model.cpu(), checkpoint, metadata)
    write_json(context.run_dir / "teacher.json", {**metadata, "checkpoint": str(checkpoint)})
    print(f"saved {checkpoint} (test accuracy {100 * accuracy:.2f}%)")
    return metadata
