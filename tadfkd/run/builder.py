"""Building a distillation run from a composed config: the one place where teacher, student,
generator, views, selection, objective, optimisers and schedule are wired together (used by the
job, the benchmark and the tests)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tadfkd.base.errors import DatasetMissing, UserError
from tadfkd.data.loading import load_split, make_loader
from tadfkd.data.views import Views
from tadfkd.distillation.loop import Distiller, Schedule
from tadfkd.distillation.nonfinite import NonFiniteGuard
from tadfkd.distillation.precision import Precision, prepare_model, resolve_precision
from tadfkd.distillation.selection import GMMSelection, Selection
from tadfkd.distillation.synthesizer import Synthesizer
from tadfkd.models import batchnorm, kernels, pooling, single_channel, winograd
from tadfkd.run.runtime import build
from tadfkd.teachers.folding import fold_batchnorm
from tadfkd.teachers.loading import Teacher

log = logging.getLogger(__name__)

# speed.scoring / speed.generation -> the autocast dtype of the selection's scoring forward or
# of the generator's forward (None: fp32); auto follows the training precision
LOW_PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def forward_dtype(setting: str, precision: Precision) -> torch.dtype | None:
    """A ``speed.scoring`` / ``speed.generation`` value as an autocast dtype (None: fp32);
    ``auto`` follows the training precision, bf16 or fp32 (fp16 training keeps it fp32)."""
    if setting == "auto":
        return precision.dtype if precision.name == "bf16" else None
    return LOW_PRECISION_DTYPES[setting]


def schedule_of(cfg: DictConfig) -> Schedule:
    """The ``trainer`` node as a ``Schedule``."""
    trainer = cfg.trainer
    return Schedule(
        epochs=int(trainer.epochs),
        iters_per_epoch=int(trainer.iters_per_epoch),
        student_steps=int(trainer.student_steps),
        batch_size=int(trainer.batch_size),
        published_scheduler_offset=bool(trainer.published_scheduler_offset),
    )


def on_if_auto(setting: str | bool, device: torch.device, auto_on: str) -> bool:
    """A ``speed`` switch: ``auto`` is on for devices of type ``auto_on`` ("cuda" or "cpu"),
    off elsewhere; true / false as given."""
    return device.type == auto_on if setting == "auto" else bool(setting)


def use_kernels(key: str, setting: str | bool, applicable: bool) -> bool:
    """A ``speed`` switch of the C kernels (``tadfkd.models.kernels``): off where ``setting``
    is false or where the kernels have nothing to do (``applicable`` false); else ``auto`` is
    on where they build, ``true`` an error where they do not."""
    if setting is False or not applicable:
        return False
    reason = kernels.unavailable_reason()
    if reason is None:
        return True
    if setting == "auto":
        log.info("%s=auto: PyTorch's kernels run (%s)", key, reason)
        return False
    raise UserError(
        f"{key}=true needs the C kernels, which did not build here ({reason}); set {key}=auto "
        "or false"
    )


def use_fused_generation(
    setting: str | bool, device: torch.device, generation_dtype: torch.dtype | None
) -> bool:
    """``speed.fused_generation``: the fused generator kernels (``tadfkd.models.fused``) for a
    bf16 generator forward on a CPU (``use_kernels``)."""
    applicable = device.type == "cpu" and generation_dtype == torch.bfloat16
    return use_kernels("speed.fused_generation", setting, applicable)


def set_generator_speed(
    generator: torch.nn.Module,
    speed: DictConfig,
    device: torch.device,
    generation_dtype: torch.dtype | None,
) -> None:
    """The DAFL generator's CPU switches (``tadfkd.models.generator``): the depthwise output
    convolution, the upsampled convolutions by phase, the fused kernels and the output
    convolution's kernels with gradients; other generators have none."""
    if not hasattr(generator, "depthwise_output"):
        return
    generator.depthwise_output = on_if_auto(speed.depthwise_output, device, "cpu")
    generator.phased_upsampling = on_if_auto(speed.phased_upsampling, device, "cpu")
    # off under torch.compile, which fuses on its own, as speed.single_channel_conv is (no
    # error for true where the kernels do not build: they would not run)
    generator.fused_kernels = not speed.compile and use_fused_generation(
        speed.fused_generation, device, generation_dtype
    )
    # the generator step runs the generator in the generation dtype: bf16 for the kernels
    applicable = device.type == "cpu" and generation_dtype == torch.bfloat16
    generator.output_kernel = not speed.compile and use_kernels(
        "speed.output_conv_kernel", speed.output_conv_kernel, applicable
    )


def adaptive_refill(setting: str, device: torch.device) -> bool:
    """``speed.refill``: ``auto`` sizes the rounds adaptively on CUDA, where a round costs a
    host synchronisation, and generates one batch a round on a CPU, where batches generated
    beyond the one that fills the student batch are pure waste (docs/performance.md)."""
    return device.type == "cuda" if setting == "auto" else setting == "adaptive"


def use_channels_last(setting: str | bool) -> bool:
    """``speed.channels_last``: ``auto`` is on, on CUDA and on a CPU alike (oneDNN's CPU
    convolutions are faster in that layout, in bf16 and in fp32: docs/performance.md)."""
    return True if setting == "auto" else bool(setting)


def fold_for_inference(
    cfg: DictConfig, teacher: torch.nn.Module, device: torch.device, channels_last: bool
) -> torch.nn.Module:
    """The teacher of the no-grad forwards: with BatchNorm folded (``speed.fold_teacher_bn``),
    checked on a fixed random batch of the dataset's shape (no global RNG is drawn), and, in
    that folded copy on a CPU, convolutions of one input channel through the C kernel
    (``speed.single_channel_conv``, ``tadfkd.models.single_channel``) and 3x3 ones by
    Winograd's algorithm (``speed.winograd_conv`` and ``speed.winograd_tile``,
    ``tadfkd.models.winograd``)."""
    if not cfg.speed.fold_teacher_bn:
        return teacher
    dataset = cfg.dataset
    shape = (2, int(dataset.channels), int(dataset.image_size), int(dataset.image_size))
    draw = torch.Generator(device=device).manual_seed(0)
    example = torch.randn(shape, generator=draw, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    folded = fold_batchnorm(teacher, example)
    applicable = folded is not teacher and channels_last and device.type == "cpu"
    applicable = applicable and not cfg.speed.compile
    if use_kernels("speed.single_channel_conv", cfg.speed.single_channel_conv, applicable):
        single_channel.use_kernel(folded)
    if use_kernels("speed.winograd_conv", cfg.speed.winograd_conv, applicable):
        winograd.use_kernel(folded, int(cfg.speed.winograd_tile))
    return folded


def use_module_kernels(
    key: str,
    speed: DictConfig,
    device: torch.device,
    channels_last: bool,
    swap: Callable[[torch.nn.Module], object],
    *models: torch.nn.Module,
) -> None:
    """The ``speed`` switch ``key`` of kernels that ``swap`` puts into a model's modules in
    place: on ``models``, on a CPU with channels-last (``use_kernels``; off under
    ``torch.compile``, which fuses on its own). ``speed.single_channel_training``: the teacher's
    and the student's convolutions of one input channel under bf16 autocast
    (``tadfkd.models.single_channel``; the folded teacher's: ``speed.single_channel_conv``,
    ``fold_for_inference``);
    ``speed.fused_pooling``: each ReLU-pool pair of the ``nn.Sequential`` containers
    (``tadfkd.models.pooling``), and with ``speed.single_channel_conv`` a kernel convolution
    and its ReLU; ``speed.batch_norm_kernel``: the BatchNorm layers in training
    (``tadfkd.models.batchnorm``)."""
    applicable = device.type == "cpu" and channels_last and not speed.compile
    if use_kernels(f"speed.{key}", speed[key], applicable):
        for model in models:
            swap(model)


def build_selection(node: DictConfig, speed: DictConfig) -> Selection:
    """The ``selection`` node's rule, its mixture fit in C where ``speed.mixture_kernel`` says so
    (``use_kernels``; on every device: the fit runs on the host)."""
    selection = build(node)
    if isinstance(selection, GMMSelection):
        selection.by_kernel = use_kernels("speed.mixture_kernel", speed.mixture_kernel, True)
    return selection


def use_model_kernels(
    cfg: DictConfig,
    device: torch.device,
    channels_last: bool,
    teacher: torch.nn.Module,
    inference_teacher: torch.nn.Module,
    student: torch.nn.Module,
    generator: torch.nn.Module,
) -> None:
    """The kernels ``use_module_kernels`` swaps into the networks' modules: the teacher's (of
    the generator step) and the student's one-input-channel convolutions under bf16 autocast
    (``speed.single_channel_training``, off by default; the folded teacher's are swapped in
    ``fold_for_inference``), the ReLU-pool pairs, the BatchNorm layers in training."""
    switch = (cfg.speed, device, channels_last)
    bf16_only = functools.partial(single_channel.use_kernel, bf16_only=True)
    use_module_kernels("single_channel_training", *switch, bf16_only, teacher, student)
    pooled = (teacher, inference_teacher, student)
    use_module_kernels("fused_pooling", *switch, pooling.use_kernel, *pooled)
    use_module_kernels("batch_norm_kernel", *switch, batchnorm.use_kernel, student, generator)


def build_distiller(cfg: DictConfig, teacher: Teacher, device: torch.device) -> Distiller:
    """A ``Distiller`` for ``teacher`` (loaded) with everything else built from ``cfg``; the
    student is initialised before the generator, from the global RNG (seed it first)."""
    speed = cfg.speed
    precision = Precision(resolve_precision(str(speed.precision), device), device)
    channels_last = use_channels_last(speed.channels_last)
    teacher_model = prepare_model(teacher.model, device, channels_last)
    inference_teacher = fold_for_inference(cfg, teacher_model, device, channels_last)
    student = prepare_model(build(cfg.student), device, channels_last)
    generator = prepare_model(build(cfg.generator), device, channels_last)
    models = (teacher_model, inference_teacher, student, generator)
    use_model_kernels(cfg, device, channels_last, *models)
    generation_dtype = forward_dtype(str(speed.generation), precision)
    set_generator_speed(generator, speed, device, generation_dtype)
    if speed.compile:
        for model in {id(m): m for m in models}.values():
            model.compile()  # in place: parameters, hooks and state dicts keep their names
    schedule = schedule_of(cfg)
    student_optimizer = build(cfg.optimizer.student)(student.parameters())
    guard = NonFiniteGuard(str(cfg.runtime.on_nonfinite))
    objective = build(cfg.method)
    synthesizer = Synthesizer(
        generator=generator,
        generator_optimizer=build(cfg.optimizer.generator)(generator.parameters()),
        teacher=teacher_model,
        views=Views(
            teacher.mean,
            teacher.std,
            int(cfg.dataset.views.crop_padding),
            bool(cfg.dataset.views.flip),
        ),
        selection=build_selection(cfg.selection, speed),
        batch_size=schedule.batch_size,
        device=device,
        precision=precision,
        guard=guard,
        inference_teacher=inference_teacher,
        adaptive_rounds=adaptive_refill(speed.refill, device),
        bucket_rounds=on_if_auto(speed.static_shapes, device, "cuda"),
        scoring_dtype=forward_dtype(str(speed.scoring), precision),
        generation_dtype=generation_dtype,
        inputs=objective.inputs,
    )
    return Distiller(
        teacher=teacher_model,
        student=student,
        synthesizer=synthesizer,
        objective=objective,
        student_optimizer=student_optimizer,
        scheduler=build(cfg.optimizer.scheduler)(student_optimizer),
        schedule=schedule,
        device=device,
        precision=precision,
    )


def load_test_set(cfg: DictConfig, teacher: Teacher) -> DataLoader | None:
    """The test set normalised for ``teacher``, in batches; None (after one note) when it is
    absent and ``runtime.require_test_set`` is false, else its absence is a ``UserError``."""
    try:
        test_set = load_split(
            build(cfg.dataset.source),
            "test",
            mean=teacher.mean,
            std=teacher.std,
            download=bool(cfg.runtime.download),
        )
    except DatasetMissing as error:
        if cfg.runtime.require_test_set:
            raise
        log.info(
            f"note: {error} Training without evaluation (runtime.require_test_set=false): "
            "teacher and student accuracies are not measured and are null in results.json."
        )
        return None
    return make_loader(
        test_set,
        int(cfg.runtime.eval_batch_size),
        shuffle=False,
        num_workers=int(cfg.runtime.num_workers),
    )
