"""What a composed config may hold, and what in it defines a run.

``RULES`` declares, in one table, the type and range of every value a user can set for the
distillation job (``python run.py``) and the teacher job; ``validate`` turns any violation into
one sentence (a ``UserError``, exit code 2) before any work is done. ``run_identity`` is what a
checkpoint must match to be resumed: every setting except the nodes that only say where and how
the job runs or reports (``RUNTIME_NODES``), with the teacher identified by the content of its file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tadfkd.base.errors import UserError
from tadfkd.run.legacy import current_form

MAX_SEED = 2**32 - 1  # numpy's seed range
# Top-level nodes that never change what a run computes (so a run may resume with others).
RUNTIME_NODES = ("runtime", "logger", "paths", "hydra", "resume", "report", "plan")
# Keys (and nodes) that locate an input rather than define it: the teacher is identified by
# its sha256, a dataset by its name and shapes, not by where and how its files are read.
LOCATION_KEYS = ("teacher.checkpoint", "dataset.source")


@dataclass(frozen=True)
class Rule:
    """``key`` must satisfy ``check`` (a predicate on the value); ``expect`` completes the
    sentence "KEY=VALUE must be ..."; ``optional`` keys may be absent (e.g. SGD's momentum)."""

    key: str
    check: Callable[[Any], bool]
    expect: str
    optional: bool = False
    # absent only together with its whole first node: the teacher job has no ``speed`` node,
    # a distillation job's ``speed`` node has every key (each one is read)
    with_node: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low and (high is None or v <= high)


def number(low: float, high: float | None = None, open_low: bool = False, open_high=False):
    def check(v: Any) -> bool:
        if not _is_number(v) or v != v:  # NaN
            return False
        above = v > low if open_low else v >= low
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    return check


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _betas(value: Any) -> bool:
    return (
        OmegaConf.is_list(value)
        and len(value) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in value)
    )


# -- Ranges of weights, rates, normalisation, timeouts and names (the last block of RULES) --
def finite(low: float, open_low: bool = False) -> Callable[[Any], bool]:
    """A finite number of at least ``low`` (above it when ``open_low``)."""
    at_least = number(low, open_low=open_low)
    return lambda v: at_least(v) and math.isfinite(v)


def finite_list(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A non-empty list whose every item passes ``check``."""
    return lambda v: OmegaConf.is_list(v) and len(v) > 0 and all(check(item) for item in v)


def name(value: Any) -> bool:
    """A name that goes into file names, tables and W&B: text, not blank, no path separator and
    no control character (a newline would break a table, a slash would make a folder)."""
    return (
        isinstance(value, str)
        and value.strip() != ""
        and "/" not in value
        and "\\" not in value
        and value.isprintable()
    )


def architecture(value: Any) -> bool:
    from tadfkd.models import ARCHITECTURES  # the registry (imported here: it needs torch)

    return isinstance(value, str) and value in ARCHITECTURES


def path_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


NAME = "a name: text without '/', '\\', a newline or other control characters"
# -- end of the block


POSITIVE = "a whole number of at least 1"
AUTO_BOOL = "auto, true or false"
AUTO_FP = "auto, fp32, bf16 or fp16"
AUTO_REFILL = "auto, adaptive or single"

RULES: tuple[Rule, ...] = (
    Rule("seed", whole(0, MAX_SEED), f"a whole number from 0 to {MAX_SEED}"),
    Rule("trainer.epochs", whole(1), POSITIVE, optional=True),
    Rule("trainer.iters_per_epoch", whole(1), POSITIVE, optional=True),
    Rule("trainer.student_steps", whole(1), POSITIVE, optional=True),
    Rule(
        "trainer.batch_size",
        whole(2),
        "a whole number of at least 2 (the mixture and the batch statistics need two samples)",
        optional=True,
    ),
    Rule("trainer.published_scheduler_offset", boolean, "true or false", optional=True),
    Rule("runtime.threads", lambda v: v == "auto" or whole(1)(v), f"auto or {POSITIVE}"),
    Rule("runtime.progress", boolean, "true or false"),
    Rule("runtime.num_workers", whole(0), "a whole number of at least 0"),
    Rule("runtime.eval_batch_size", whole(1), POSITIVE),
    Rule("runtime.image_every", whole(0), "a whole number of at least 0 (0: never)"),
    Rule("runtime.on_nonfinite", one_of("stop", "skip"), "stop or skip"),
    Rule("runtime.download", boolean, "true or false"),
    Rule("runtime.require_test_set", boolean, "true or false"),
    Rule("speed.precision", one_of("auto", "fp32", "bf16", "fp16"), AUTO_FP, with_node=True),
    Rule("speed.compile", boolean, "true or false", with_node=True),
    Rule("speed.channels_last", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.refill", one_of("auto", "adaptive", "single"), AUTO_REFILL, with_node=True),
    Rule("speed.static_shapes", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.fold_teacher_bn", boolean, "true or false", with_node=True),
    Rule("speed.scoring", one_of("auto", "fp32", "bf16"), "auto, fp32 or bf16", with_node=True),
    Rule("speed.generation", one_of("auto", "fp32", "bf16"), "auto, fp32 or bf16", with_node=True),
    Rule("speed.depthwise_output", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.phased_upsampling", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.fused_generation", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.single_channel_conv", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.winograd_conv", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.winograd_tile", lambda v: _is_int(v) and v in (2, 4), "2 or 4", with_node=True),
    Rule("speed.fused_pooling", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.mixture_kernel", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.batch_norm_kernel", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.output_conv_kernel", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("speed.single_channel_training", one_of("auto", True, False), AUTO_BOOL, with_node=True),
    Rule("dataset.num_classes", whole(2), "a whole number of at least 2"),
    Rule("dataset.channels", whole(1), POSITIVE),
    Rule(
        "dataset.image_size",
        lambda v: whole(4)(v) and v % 4 == 0,
        "a positive multiple of 4 (the generator upsamples twice by 2)",
    ),
    Rule("dataset.views.crop_padding", whole(0), "a whole number of pixels, at least 0"),
    Rule("dataset.views.flip", boolean, "true or false"),
    Rule("dataset.augmentation.crop_padding", whole(0), "a whole number of pixels, at least 0"),
    Rule("dataset.augmentation.flip", boolean, "true or false"),
    Rule("generator.nz", whole(1), POSITIVE, optional=True),
    Rule("generator.width", whole(2), "a whole number of at least 2", optional=True),
    Rule(
        "selection.threshold",
        number(0, 1, open_low=True, open_high=True),
        "a number strictly between 0 and 1, e.g. 0.5",
        optional=True,
    ),
    Rule("selection.max_iter", whole(1), POSITIVE, optional=True),
    Rule("selection.tol", number(0, open_low=True), "a positive number", optional=True),
    Rule("selection.reg_covar", number(0, open_low=True), "a positive number", optional=True),
    Rule("selection.max_batches", whole(1), POSITIVE, optional=True),
    Rule("method.inputs.augment", boolean, "true or false", optional=True),
    Rule("method.inputs.sample_mode", one_of("train", "eval"), "train or eval", optional=True),
    Rule("method.inputs.student_mode", one_of("train", "eval"), "train or eval", optional=True),
    Rule(
        "method.inputs.noise",
        one_of("fresh", "generator_step"),
        "fresh or generator_step",
        optional=True,
    ),
    Rule("optimizer.student.lr", number(0, open_low=True), "a positive number", optional=True),
    Rule("optimizer.generator.lr", number(0, open_low=True), "a positive number", optional=True),
    Rule("optimizer.student.momentum", number(0), "a number of at least 0", optional=True),
    Rule("optimizer.student.weight_decay", number(0), "a number of at least 0", optional=True),
    Rule("optimizer.generator.weight_decay", number(0), "a number of at least 0", optional=True),
    Rule("optimizer.generator.betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.999]", True),
    Rule(
        "logger.mode", one_of("offline", "online", "disabled"), "offline, online or disabled", True
    ),
    Rule("logger.log_model", boolean, "true or false", optional=True),
    Rule("recipe.epochs", whole(1), POSITIVE, optional=True),
    Rule("recipe.batch_size", whole(1), POSITIVE, optional=True),
    Rule("recipe.lr", number(0, open_low=True), "a positive number", optional=True),
    Rule("recipe.momentum", number(0), "a number of at least 0", optional=True),
    Rule("recipe.weight_decay", number(0), "a number of at least 0", optional=True),
    Rule("recipe.label_smoothing", number(0, 1, open_high=True), "a number in [0, 1)", True),
    Rule("recipe.augment", boolean, "true or false", optional=True),
    Rule("recipe.erase", number(0, 1), "a probability in [0, 1]", optional=True),
    # -- Ranges of weights, rates, normalisation, timeouts and names (helpers above POSITIVE) --
    Rule("method.generator_terms.*.weight", finite(0), "a finite number of at least 0"),
    Rule("optimizer.student.lr", finite(0, True), "a finite positive number", optional=True),
    Rule("optimizer.generator.lr", finite(0, True), "a finite positive number", optional=True),
    Rule("recipe.lr", finite(0, True), "a finite positive number", optional=True),
    Rule("method.generator_terms.*.temperature", finite(0, True), "a finite positive number", True),
    Rule("method.student_loss.temperature", finite(0, True), "a finite positive number", True),
    Rule("method.generator_terms.*.detach_teacher", boolean, "true or false", optional=True),
    Rule("teacher.mean", finite_list(finite(-math.inf)), "a list of finite numbers, e.g. [0.5]"),
    Rule(
        "teacher.std", finite_list(finite(0, True)), "a list of positive finite numbers, e.g. [0.5]"
    ),
    Rule("teacher.name", name, NAME),
    Rule("teacher.arch", architecture, "a known architecture (README.md, Using your own teacher)"),
    Rule("teacher.checkpoint", path_text, "the path of the teacher's .pt file"),
    Rule("student.arch", architecture, "a known architecture (conf/student/)", optional=True),
    Rule("dataset.name", name, NAME),
    Rule("method.name", name, NAME, optional=True),
    Rule("logger.project", name, NAME, optional=True),
    Rule("logger.entity", lambda v: v is None or name(v), f"null or {NAME}", optional=True),
    Rule("logger.group", lambda v: v is None or name(v), f"null or {NAME}", optional=True),
    Rule("logger.job_type", lambda v: v is None or name(v), f"null or {NAME}", optional=True),
    Rule("logger.init_timeout", finite(0, True), "a finite positive number of seconds", True),
    Rule("runtime.check_teacher_dataset", boolean, "true or false", optional=True),
    Rule("runtime.keep_freed_memory", boolean, "true or false", optional=True),
    Rule(
        "runtime.secret_env",
        lambda v: OmegaConf.is_list(v) and all(name(item) for item in v),
        "a list of environment variable names, e.g. [MY_TOKEN]",
        optional=True,
    ),
)


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of ``key``, interpolations resolved."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if parent is None or not OmegaConf.is_dict(parent) or leaf not in parent:
        return False, None
    return True, parent[leaf]


def check_rules(cfg: DictConfig, prefix: str = "") -> None:
    """Check the values of ``RULES`` whose key starts with ``prefix`` (all by default)."""
    for rule in RULES:
        if rule.key.startswith(prefix):
            for key in _keys(cfg, rule.key):
                _check(cfg, rule, key)


def _keys(cfg: DictConfig, pattern: str) -> list[str]:
    """The keys a rule applies to: itself, or with each ``*`` every key of the mapping there
    (``method.generator_terms.*.weight``: the weight of every term)."""
    mapping, star, rest = pattern.partition(".*")
    if not star:
        return [pattern]
    present, node = _value(cfg, mapping)
    if not present or not OmegaConf.is_dict(node):
        return []
    return [key for child in node for key in _keys(cfg, f"{mapping}.{child}{rest}")]


def _check(cfg: DictConfig, rule: Rule, key: str) -> None:
    """One value against its rule: a one-sentence ``UserError`` naming ``key`` if it fails."""
    present, value = _value(cfg, key)
    if not present:
        if rule.optional or (rule.with_node and not _value(cfg, key.split(".")[0])[0]):
            return
        raise UserError(f"{key} is missing from the config; set {key}=...")
    if not rule.check(value):
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise UserError(f"{key}={shown!r} must be {rule.expect}.")


def validate(cfg: DictConfig) -> None:
    """Check every value of ``RULES`` and the consistency of dataset, teacher and student;
    the first problem is a ``UserError`` of one sentence."""
    check_rules(cfg)
    teacher, dataset = cfg.teacher, cfg.dataset
    if int(teacher.num_classes) != int(dataset.num_classes):
        raise UserError(
            f"teacher {teacher.name} has {teacher.num_classes} classes but dataset "
            f"{dataset.name} has {dataset.num_classes}; pick a matching teacher."
        )
    if int(teacher.in_channels) != int(dataset.channels):
        raise UserError(
            f"teacher {teacher.name} takes {teacher.in_channels} input channels but dataset "
            f"{dataset.name} has {dataset.channels}; pick a teacher for this dataset."
        )
    student = cfg.get("student")
    student_classes = student.get("num_classes") if student is not None else None
    if student_classes is not None and int(student_classes) != int(teacher.num_classes):
        raise UserError(
            f"student {student.arch} has {student_classes} classes but teacher "
            f"{teacher.name} has {teacher.num_classes}; leave student.num_classes unset."
        )


def run_identity(cfg: DictConfig, teacher_sha256: str) -> dict[str, Any]:
    """The resolved settings that define what a run computes, flattened to ``a.b.c`` keys:
    every node but ``RUNTIME_NODES`` and ``LOCATION_KEYS``, plus ``teacher.sha256``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix[:-1] in LOCATION_KEYS:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    for key in cfg:  # node by node, so that the hydra node (in tests) is never resolved
        if key not in RUNTIME_NODES:
            node = cfg[key]
            walk(
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node,
                f"{key}.",
            )
    flat["teacher.sha256"] = teacher_sha256
    return flat


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` with settings that compute something else
    (``saved`` may be in a former form: ``legacy.current_form``)."""
    saved = current_form(saved)
    differing = sorted(
        key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key)
    )
    if differing:
        shown = ", ".join(f"{key}={saved.get(key)!r} there" for key in differing[:3])
        if differing == ["teacher.sha256"]:
            shown = "another teacher file: its content differs"
        raise UserError(
            f"{path} was written by a run with other settings ({shown}); re-run with the same "
            "overrides to resume it, or pick a new hydra.run.dir for a new run."
        )
