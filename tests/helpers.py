"""What the tests share (helpers, not tests): composing the real config, running the entry points
as a user does, teacher files, and a tiny distiller built by the project's own builder.

Test modules import from here (and from ``fakedata``), never from each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from tadfkd.data.loading import Augmentation
from tadfkd.distillation.loop import Distiller
from tadfkd.models import build_classifier, kernels
from tadfkd.run.builder import build_distiller
from tadfkd.teachers.loading import random_teacher

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
CPU = torch.device("cpu")
# the C kernels' tests (tadfkd.models.kernels) need a compiler that builds them
needs_kernels = pytest.mark.skipif(
    kernels.kernels() is None, reason=f"the kernels did not build: {kernels.unavailable_reason()}"
)


def compose_config(
    overrides: list[str] = (), config_name: str = "config", hydra_node: bool = True
) -> DictConfig:
    """The config an entry point would see with these command-line overrides (with the hydra
    node unless ``hydra_node`` is false: the job's own config, as ``distil`` receives it)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_node)


def dataset_source(name: str, data: str | Path = "unused", *overrides: str):
    """The source ``dataset=<name>`` reads its files with (its ``source`` node, built), under
    ``paths.data=data`` and with further overrides (``dataset.source.folders.3=/elsewhere``)."""
    cfg = compose_config([f"dataset={name}", f"paths.data={data}", *overrides], hydra_node=False)
    return instantiate(cfg.dataset.source)


def configured(name: str) -> Augmentation:
    """The teacher-training augmentation of ``conf/dataset/<name>.yaml``."""
    node = compose_config([f"dataset={name}"]).dataset.augmentation
    return Augmentation(int(node.crop_padding), bool(node.flip))


def translations(image: torch.Tensor, padding: int, fill: torch.Tensor) -> list[torch.Tensor]:
    """Every crop of ``image`` (C, H, W) padded with per-channel ``fill`` (C,) by ``padding``."""
    channels, height, width = image.shape
    padded = fill.view(-1, 1, 1).expand(channels, height + 2 * padding, width + 2 * padding)
    padded = padded.clone()
    padded[:, padding : padding + height, padding : padding + width] = image
    return [
        padded[:, top : top + height, left : left + width]
        for top in range(2 * padding + 1)
        for left in range(2 * padding + 1)
    ]


def options(group: str) -> list[str]:
    """Every option of a config group, by file name (a group's ``base`` excluded)."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml") if path.stem != "base")


def environment(**extra: str) -> dict[str, str]:
    """The environment of an entry point run by a test: no W&B or Hydra settings of the caller,
    the repository as TADFKD_ROOT, unbuffered output, one CPU thread (tests share the cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(TADFKD_ROOT=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def command(*args: str, entry: str = "run.py") -> list[str]:
    """``python <entry> args``; ``entry`` is a script of the repository or ``-m module``."""
    target = entry.split() if entry.startswith("-m") else [str(ROOT / entry)]
    return [sys.executable, *target, *args]


def run_entry(
    *args: str, entry: str = "run.py", env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run an entry point to its end, as a user would from the repository root."""
    return subprocess.run(
        command(*args, entry=entry),
        cwd=ROOT,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_entry(*args: str, entry: str = "run.py", env: dict[str, str] | None = None):
    """Start an entry point and return the process (stdout and stderr together, as text)."""
    return subprocess.Popen(
        command(*args, entry=entry),
        cwd=ROOT,
        env=env or environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_wandb_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """The one offline W&B run under ``run_dir`` as wandb's own reader (``wandb leet inspect``)
    shows it: its state (state, exit_code, name, config, summary, tags, ...) and its records
    (``{"type": "metric" | "history" | "artifact" | "preempting" | "exit" | ..., ...}``)."""
    [log] = (Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]

    def read(*flags: str) -> str:
        result = subprocess.run(
            [*inspect, *flags, str(log)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    records = [json.loads(line) for line in read().splitlines() if line.strip()]
    return json.loads(read("--summary")), records


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2 and one ``error: ...`` sentence on stderr holding every fragment."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def save_random_teacher(path: Path, arch: str, num_classes: int, in_channels: int = 3) -> Path:
    """A random-weight ``arch`` saved as a raw state dict at ``path``."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_classifier(arch, num_classes, in_channels).state_dict(), path)
    return path


class KeepEvery:
    """A selection that keeps every n-th sample of each batch (or none), counting its calls."""

    enabled = True

    def __init__(self, every: int | None, max_batches: int = 32) -> None:
        self.every = every
        self.max_batches = max_batches
        self.calls = 0

    def keep_mask(self, logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        self.calls += 1
        keep = torch.zeros(logits.shape[0] // chunk_size, chunk_size, dtype=torch.bool)
        if self.every:
            keep[:, :: self.every] = True
        return keep.view(-1)


def tiny_distiller(
    *overrides: str, selection=None, teacher_arch: str = "digits_cnn_s", seed: int = 0
) -> Distiller:
    """The digits job's distiller built by ``build_distiller`` on the CPU, shrunk (generator
    width 8, nz 8; batch 16; 2 iterations of 2 student steps) with a random ``teacher_arch``
    teacher; ``selection`` replaces the configured one."""
    cfg = compose_config(
        [
            "generator.width=8",
            "generator.nz=8",
            "trainer.batch_size=16",
            "trainer.iters_per_epoch=2",
            "trainer.student_steps=2",
            "trainer.epochs=1",
            "runtime.device=cpu",
            f"teacher.arch={teacher_arch}",
            *overrides,
        ],
        hydra_node=False,
    )
    torch.manual_seed(seed)
    distiller = build_distiller(cfg, random_teacher(cfg.teacher), CPU)
    if selection is not None:
        distiller.synthesizer.selection = selection
    return distiller


class TinyTeacher(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear head: one BN layer and penultimate features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def networks_holding(kind: type[nn.Module], overrides: list[str]) -> list[str]:
    """Which networks of the benchmark's fast path built with ``overrides`` (on the CPU) hold
    a ``kind`` module: the kernels' switches swap such modules in."""
    from tadfkd.bench.setting import bench_config, build_path

    built = build_path(bench_config(overrides), CPU, published=False, seed=0)
    networks = {
        "teacher": built.teacher,
        "inference teacher": built.inference_teacher,
        "student": built.student,
        "generator": built.synthesizer.generator,
    }
    return [
        name
        for name, network in networks.items()
        if any(isinstance(module, kind) for module in network.modules())
    ]
