"""The benchmark's settings and the two paths it compares, built from the run's own config with
random-weight networks (no data or teacher file is needed): the fast path is this project's
``Distiller``; the published-style path is the same with the ``PUBLISHED_STYLE`` settings, the
reference's scoring and selection and (``published_style`` on its config, as ``bench.compare``
applies it) the reference's BN statistics (``bench.published``). Also the machine's name, and
what every benchmark's command line shares: its config overrides checked as a run's (a bad one
is a one-sentence ``UserError``) and the argparse type of its counts."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from tadfkd.base.errors import UserError
from tadfkd.bench.published import PublishedStyleScorer
from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.precision import cpu_has_bf16
from tadfkd.run.builder import build_distiller
from tadfkd.run.checks import check_rules
from tadfkd.run.runtime import cpu_name
from tadfkd.teachers.loading import random_teacher

CONF = Path(__file__).resolve().parents[2] / "conf"

# The two settings, as overrides of the run's config: the published CIFAR-10 command, and the
# digits default (``--small``), both with random-weight networks.
SETTINGS = {
    "cifar10": ["experiment=cifar10"],
    "small": [],
    "fashion_mnist": ["experiment=fashion_mnist"],
}


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0 (iterations, pairs, threads, a batch size)."""
    return _whole_number(text, least=1, words="above 0")


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (warm-up iterations)."""
    return _whole_number(text, least=0, words="of at least 0")


def _whole_number(text: str, least: int, words: str) -> int:
    """``text`` as a whole number of at least ``least``, else argparse's error saying it is not
    a whole number ``words``."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {words}")
    return value


def thread_counts(text: str) -> list[int]:
    """An argparse type: comma-separated thread counts, each above 0 ("1,2")."""
    return [positive_int(count) for count in text.split(",")]


def bench_config(overrides: list[str]) -> DictConfig:
    """The run's config with ``overrides`` (no W&B, no test set needed), its values checked as
    a run's are: a bad ``--set`` value, an unknown key or an unparsable override is a
    one-sentence ``UserError``."""
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "logger=none"])
    except (HydraException, ValueError) as error:  # ValueError: e.g. "=3", a key-less override
        # a parse error names the override it could not read; its message may not
        override = getattr(error, "override", None)
        refused = "an override" if override is None else repr(override)
        reason = hydra_reason(str(error))
        raise UserError(f"the benchmark's config refused {refused}: {reason}.") from None
    check_rules(cfg)
    return cfg


def hydra_reason(message: str) -> str:
    """Hydra's error in one line, without its link to the override grammar: its first two lines
    ("Could not override 'speed.nope'.", "To append to your config use +speed.nope=1"; "Error
    parsing override 'speed.compile'", "missing EQUAL at '<EOF>'"), or its first line and the
    options it lists ("Could not find 'dataset/nope'", "Available options in 'dataset':", one
    a line)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("See http")]
    if len(lines) > 1 and lines[1].endswith(":"):
        options = itertools.takewhile(lambda line: not line.endswith(":"), lines[2:])
        return f"{lines[0]}; {lines[1]} {', '.join(options)}"
    return "; ".join(line.rstrip(".") for line in lines[:2])


def build_path(cfg: DictConfig, device: torch.device, published: bool, seed: int) -> Distiller:
    """The run's ``Distiller`` (published: the reference's scorer; ``cfg`` brings the rest, e.g.
    ``PUBLISHED_STYLE`` and ``published_style``) with random-weight networks from ``seed``."""
    torch.manual_seed(seed)
    distiller = build_distiller(cfg, random_teacher(cfg.teacher), device)
    if published:
        synthesizer = distiller.synthesizer
        synthesizer.scorer = PublishedStyleScorer(
            distiller.inference_teacher, synthesizer.selection
        )
    return distiller


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and whether it has bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} (bf16 units: {'yes' if cpu_has_bf16() else 'no'})"
