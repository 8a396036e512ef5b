"""Kept-set agreement of the speed settings (``python -m tadfkd.bench --agreement``): the keep
decisions of a trained teacher on generated batches, each speed setting that can change them
against the all-fp32 reference."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tadfkd.base.errors import UserError
from tadfkd.bench.published import ScikitLearnGMMSelection
from tadfkd.distillation.precision import resolve_precision
from tadfkd.models import kernels
from tadfkd.run.builder import build_distiller

REFERENCE = "reference (fp32, unfolded)"
# the mixture's settings, which the published fit shares with this project's
MIXTURE_SETTINGS = ("threshold", "max_iter", "tol", "reg_covar")
# what every compared variant starts from: fp32, and each setting that can change a keep
# decision off but for the one the variant names
FP32 = [
    "speed.precision=fp32",
    "speed.scoring=fp32",
    "speed.generation=fp32",
    "speed.phased_upsampling=false",
    "speed.fused_pooling=false",
    "speed.mixture_kernel=false",
    "speed.batch_norm_kernel=false",
    "speed.winograd_conv=false",
]
# the variants of the C kernels: where none builds (or off the CPU) each computes the same as
# without them, so they are left out
KERNEL_VARIANTS = (
    "fold_teacher_bn=true, single_channel_conv=true",
    "fold_teacher_bn=true, winograd_conv=true",
    "fold_teacher_bn=true, winograd_conv=true, winograd_tile=2",
    "fused_pooling=true",
    "mixture_kernel=true",
    "batch_norm_kernel=true",
    "generation=bf16, fused_generation=true",
)

# the folded teacher with its 3x3 convolutions by Winograd's algorithm (the default tile)
WINOGRAD = [
    *FP32,
    "speed.depthwise_output=false",
    "speed.single_channel_conv=false",
    "speed.winograd_conv=true",
    "speed.winograd_tile=4",
    "speed.compile=false",
]


def variants(cfg: DictConfig, device: torch.device) -> dict[str, list[str]]:
    """The reference and the speed settings ``agreement`` compares, as config overrides (each
    in fp32 but for what it names, whatever ``--set`` gave the scoring and the generator)."""
    default_precision = resolve_precision(str(cfg.speed.precision), device)
    found = {
        REFERENCE: [
            *FP32,
            "speed.fold_teacher_bn=false",
            "speed.depthwise_output=false",
        ],
        "fold_teacher_bn=true": [
            *FP32,
            "speed.depthwise_output=false",
            "speed.single_channel_conv=false",
        ],
        "fold_teacher_bn=true, single_channel_conv=true": [
            *FP32,
            "speed.depthwise_output=false",
            "speed.single_channel_conv=true",
            "speed.compile=false",
        ],
        "fold_teacher_bn=true, winograd_conv=true": WINOGRAD,
        "fold_teacher_bn=true, winograd_conv=true, winograd_tile=2": [
            *WINOGRAD,
            "speed.winograd_tile=2",
        ],
        "depthwise_output=true": [*FP32, "speed.depthwise_output=true"],
        "phased_upsampling=true": [*FP32, "speed.phased_upsampling=true"],
        "fused_pooling=true": [*FP32, "speed.fused_pooling=true", "speed.compile=false"],
        "mixture_kernel=true": [*FP32, "speed.mixture_kernel=true"],
        "batch_norm_kernel=true": [*FP32, "speed.batch_norm_kernel=true", "speed.compile=false"],
        "scoring=bf16": [*FP32, "speed.scoring=bf16"],
        "generation=bf16": [*FP32, "speed.generation=bf16", "speed.fused_generation=false"],
        "generation=bf16, fused_generation=true": [
            *FP32,
            "speed.generation=bf16",
            "speed.fused_generation=true",
            "speed.compile=false",
        ],
        "generation=bf16, scoring=bf16": [
            *FP32,
            "speed.generation=bf16",
            "speed.fused_generation=false",
            "speed.scoring=bf16",
        ],
        f"this device's default (speed.precision=auto: {default_precision})": [],
    }
    if device.type != "cpu" or kernels.kernels() is None:
        for name in KERNEL_VARIANTS:
            del found[name]
    return found


def agreement(
    cfg: DictConfig, device: torch.device, generator_run: Path | None, samples: int = 4096
) -> dict[str, float]:
    """Keep decisions of the configured (trained) teacher on ``samples`` generated samples (in
    whole batches), the reference (everything fp32, BatchNorm unfolded, the generator's
    convolutions as published) against each speed setting that can change them (folding, the
    depthwise output convolution, bf16 scoring, a bf16 generator forward with PyTorch's
    kernels and, on a CPU where they build, with the fused ones, the folded teacher's
    one-input-channel convolutions through the C kernel and its 3x3 ones by Winograd's
    algorithm, this device's default): the
    share left unchanged by each (fractions; printed as percent, with the share each keeps:
    a setting can shift the kept share, not only swap decisions), and with a mixture selection
    ``published_fit_yardstick``'s two shares under their own names. On a CPU at one torch
    thread, as a sweep's job runs, where every C kernel applies."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        masks, logits = keep_masks(cfg, device, generator_run, samples)
    finally:
        torch.set_num_threads(threads)
    reference = masks.pop(REFERENCE)
    print(
        f"teacher {cfg.teacher.name} ({cfg.teacher.arch}), generator "
        f"{generator_run or 'untrained'}, {reference.numel()} generated samples, "
        f"{100 * reference.float().mean():.1f}% kept by the reference (fp32, unfolded)"
        + (", one CPU thread" if device.type == "cpu" else "")
    )
    shares = {}
    for name, mask in masks.items():
        shares[name] = float((mask == reference).float().mean())
        print(
            f"{name}: {100 * shares[name]:.2f}% of the keep decisions unchanged, "
            f"{100 * mask.float().mean():.1f}% kept"
        )
    if all(key in cfg.selection for key in MIXTURE_SETTINGS):  # a mixture selection
        shares |= published_fit_yardstick(cfg, logits, reference)
    return shares


def published_fit_yardstick(
    cfg: DictConfig, logits: torch.Tensor, reference: torch.Tensor, starts: int = 4
) -> dict[str, float]:
    """For scale: the published selection (scikit-learn's mixture from its random k-means
    start, ``ScikitLearnGMMSelection``) fitted ``starts`` times to the reference's scores
    ``logits`` (batches, batch size, K), each start seeded apart: the mean share of keep
    decisions two starts agree on, and the mean share on which this project's fit (the keep
    mask ``reference``) agrees with one start (fractions; printed as percent, with ranges)."""
    settings = {key: cfg.selection[key] for key in MIXTURE_SETTINGS}
    published = [
        ScikitLearnGMMSelection(random_state=start, **settings).keep_mask(
            logits.flatten(0, 1), logits.shape[1]
        )
        for start in range(starts)
    ]
    between = [
        float((published[i] == published[j]).float().mean())
        for i in range(starts)
        for j in range(i + 1, starts)
    ]
    ours = [float((mask == reference).float().mean()) for mask in published]
    found = {"published fit, another start": between, "this fit against the published fit": ours}
    print(f"for scale, the published fit from {starts} random starts, on the reference's scores:")
    for name, values in found.items():
        print(
            f"{name}: {100 * sum(values) / len(values):.2f}% of the keep decisions the same "
            f"(range {100 * min(values):.2f}-{100 * max(values):.2f}%)"
        )
    return {name: sum(values) / len(values) for name, values in found.items()}


def keep_masks(
    cfg: DictConfig, device: torch.device, generator_run: Path | None, samples: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each ``variants`` entry's keep mask on the same generated samples (``agreement``), and
    the reference's scoring logits of them (batches, batch size, K)."""
    from tadfkd.run.checkpoint import load_checkpoint
    from tadfkd.run.runtime import build

    trained = None  # the generator's weights, read once for every variant
    if generator_run is not None:
        saved = load_checkpoint(generator_run)
        if saved is None:
            raise UserError(
                f"--generator {generator_run} holds no checkpoint; give a run directory."
            )
        trained = saved[0]["distiller"]["generator"]
    masks: dict[str, torch.Tensor] = {}
    for name, overrides in variants(cfg, device).items():
        variant_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        torch.manual_seed(0)
        distiller = build_distiller(variant_cfg, build(cfg.teacher), device)
        synthesizer = distiller.synthesizer
        if trained is not None:
            synthesizer.generator.load_state_dict(trained)
        torch.manual_seed(1)
        batches = max(1, samples // synthesizer.batch_size)
        with torch.no_grad():
            images = torch.cat(
                [synthesizer.generate(synthesizer.batch_size) for _ in range(batches)]
            )
            # the selection's own scoring (synthesizer.keep_mask), with the logits kept
            masks[name], logits = synthesizer.scored(synthesizer.views.test_view(images))
            if name == REFERENCE:
                reference_logits = logits.float().reshape(batches, synthesizer.batch_size, -1)
    return masks, reference_logits
