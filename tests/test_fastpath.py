"""The speed settings change how fast the loop runs, not what it computes (within tolerances).

Networks are the small benchmark setting (digits-sized, random weights); bf16 autocast runs on
the CPU too, so the precision checks need no GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, tiny_distiller
from torch import nn

import tadfkd.distillation.precision
import tadfkd.distillation.synthesizer
from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.bench.setting import bench_config, build_path
from tadfkd.distillation.loop import Distiller
from tadfkd.distillation.precision import Precision, cpu_has_bf16, resolve_precision
from tadfkd.distillation.selection import fill_order
from tadfkd.distillation.synthesizer import Synthesizer, mode
from tadfkd.models import ARCHITECTURES, build_classifier
from tadfkd.run.builder import adaptive_refill, on_if_auto
from tadfkd.teachers.folding import fold_batchnorm
from tadfkd.teachers.loading import read_state_dict

CPU = torch.device("cpu")
DIGITS_TEACHER = ROOT / "Pretrained_Teachers" / "digits" / "digits_cnn.pt"

NZ = 100  # the digits default generator's noise size


def small(
    precision: str = "fp32",
    batch_size: int = 64,
    device: str = "cpu",
    fold: bool = False,
    generation: str = "fp32",
) -> Distiller:
    """The benchmark's small setting (the digits default, random weights) at ``batch_size``;
    the teacher's no-grad forwards unfolded unless ``fold`` (tests that compare teachers); the
    generator's forward in ``generation`` precision (fp32: only the training forwards vary)."""
    overrides = [f"speed.precision={precision}", f"trainer.batch_size={batch_size}"]
    overrides.append(f"speed.generation={generation}")
    overrides.append(f"speed.fold_teacher_bn={fold}")
    cfg = bench_config([*overrides, f"runtime.device={device}"])
    return build_path(cfg, torch.device(device), published=False, seed=0)


def feed_noise(synthesizer: Synthesizer, noise: list[torch.Tensor]) -> None:
    """Make ``synthesizer.generate`` consume ``noise`` batch by batch instead of drawing it."""
    queue = list(noise)
    synthesizer.generate = lambda n: synthesizer.generator(queue.pop(0))


def test_scoring_several_batches_together_keeps_exactly_what_one_at_a_time_keeps(monkeypatch):
    size = 64
    torch.manual_seed(1)
    noise = [torch.randn(size, NZ) for _ in range(12)]
    # The last batch's random subset uses the same draws in both paths.
    monkeypatch.setattr(
        tadfkd.distillation.synthesizer,
        "fill_order",
        lambda keep, n: fill_order(keep, n, generator=torch.Generator().manual_seed(0)),
    )
    batches = {}
    for name in ("one at a time", "together"):
        synthesizer = small(batch_size=size).synthesizer
        if name == "one at a time":  # the reference's refill: one batch, then decide
            synthesizer.adaptive_rounds = False
        else:
            synthesizer.adaptive_rounds = True  # speed.refill=adaptive (auto on CUDA)
            synthesizer.selection_rate = 0.1  # plans ~11 batches in one round: more than needed
        feed_noise(synthesizer, noise)
        torch.manual_seed(2)  # the train views' crop draws
        batches[name], counters = synthesizer.student_batch()
        used = counters[schema.BATCHES_USED]
        batches[name + " used"] = used
        if name == "together":  # one round planned more batches than the student batch used
            assert counters[schema.GENERATED] / size > used
    assert batches["together used"] == batches["one at a time used"] > 1
    torch.testing.assert_close(batches["together"], batches["one at a time"])


def test_the_generator_runs_once_per_batch_so_its_batch_norm_sees_one_batch():
    synthesizer = small(batch_size=32).synthesizer
    synthesizer.adaptive_rounds = True  # rounds of several batches
    synthesizer.selection_rate = 0.25
    seen = []
    synthesizer.generator.conv_blocks0[0].register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[0])
    )
    synthesizer.student_batch()
    assert len(seen) >= 2 and set(seen) == {32}


def test_the_refill_plans_rounds_from_the_last_selection_rate_within_the_bound():
    synthesizer = small(batch_size=100).synthesizer
    synthesizer.adaptive_rounds = True
    assert synthesizer.batches_per_round(100) == 1  # no rate known yet
    synthesizer.selection_rate = 1.0
    assert synthesizer.batches_per_round(100) == 1
    synthesizer.selection_rate = 0.4
    assert synthesizer.batches_per_round(100) == 3
    assert synthesizer.batches_per_round(10) == 1
    synthesizer.selection_rate = 0.0
    assert synthesizer.batches_per_round(100) == synthesizer.selection.max_batches


def test_bf16_keeps_the_same_samples_as_fp32():
    # Generation and selection are never autocast, so the kept set cannot depend on precision.
    fp32, bf16 = small("fp32").synthesizer, small("bf16").synthesizer
    torch.manual_seed(3)
    with torch.no_grad():
        images = torch.cat([fp32.generate(64) for _ in range(4)])
    assert torch.equal(fp32.keep_mask(images), bf16.keep_mask(images))


def test_bf16_student_step_matches_fp32_within_tolerance():
    """Student L1 loss within 1% (relative) and the SGD update within 5% (relative norm)."""
    fp32, bf16 = small("fp32"), small("bf16")
    torch.manual_seed(4)
    with torch.no_grad():
        batch = fp32.synthesizer.views.train_view(fp32.synthesizer.generate(64))
    updates = {}
    for name, distiller in (("fp32", fp32), ("bf16", bf16)):
        distiller.synthesizer.student_batch = lambda: (batch, {})
        before = [p.detach().clone() for p in distiller.student.parameters()]
        distiller.student_step()
        updates[name] = torch.cat(
            [
                (p.detach() - b).flatten()
                for p, b in zip(distiller.student.parameters(), before, strict=True)
            ]
        )
    loss32, loss16 = fp32.meter.sums[schema.STUDENT_LOSS], bf16.meter.sums[schema.STUDENT_LOSS]
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    difference = (updates["bf16"] - updates["fp32"]).norm() / updates["fp32"].norm()
    assert difference < 5e-2


@pytest.mark.parametrize("generation, gradient_tolerance", [("fp32", 1e-2), ("bf16", 5e-2)])
def test_bf16_generator_step_matches_fp32_within_tolerance(generation, gradient_tolerance):
    """Every loss term within 0.1% (relative) and the generator gradient within 1% (norm), or
    5% when the generator's own forward runs in bf16 too (speed.generation)."""
    fp32, bf16 = small("fp32"), small("bf16", generation=generation)
    for distiller in (fp32, bf16):
        torch.manual_seed(5)  # the same noise and views in both
        distiller.meter.add(generator_step(distiller))
    for term in ("generator", "adversarial", "bn", "tv", "l2"):
        value32 = float(fp32.meter.sums[schema.loss_key(term)])
        assert float(bf16.meter.sums[schema.loss_key(term)]) == pytest.approx(value32, rel=1e-3)
    grads = {
        name: torch.cat([p.grad.flatten() for p in d.synthesizer.generator.parameters()])
        for name, d in (("fp32", fp32), ("bf16", bf16))
    }
    assert (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm() < gradient_tolerance


def generator_step(distiller: Distiller) -> dict:
    return distiller.synthesizer.generator_step(distiller.student, distiller.objective)


def test_bn_statistics_hooks_record_fp32_under_autocast():
    distiller = small("bf16")
    torch.manual_seed(6)
    metrics = generator_step(distiller)
    assert metrics[schema.loss_key("bn")].dtype == torch.float32


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ({"avx512_bf16": True, "amx_bf16": False}, "bf16"),  # AMD EPYC (Zen 4) kind
        ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),  # Intel with AMX kind
        ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, "fp32"),  # no bf16 units
        ({}, "fp32"),
    ],
)
def test_precision_auto_on_the_cpu_follows_its_bf16_units(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_has_bf16() is (expected == "bf16")
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_precision_without_torch_capabilities_is_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert resolve_precision("auto", CPU) == "fp32"


def test_explicit_precisions_are_taken_as_given_or_refused_in_one_sentence():
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="speed.precision=fp8 is unknown"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_the_default_run_builds_for_the_cpu_it_finds_and_trains(monkeypatch, bf16_units):
    """auto: bf16 and a bf16 generator forward on a bf16 CPU, the published fp32 on one
    without (the fallback, forced here); channels-last on both; either way an iteration runs."""
    monkeypatch.setattr(tadfkd.distillation.precision, "cpu_has_bf16", lambda: bf16_units)
    distiller = tiny_distiller()
    synthesizer = distiller.synthesizer
    assert distiller.precision.name == ("bf16" if bf16_units else "fp32")
    conv = distiller.student.features[3].weight  # 8 -> 16 channels (1 input channel: both)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert synthesizer.generation_dtype == (torch.bfloat16 if bf16_units else None)
    assert synthesizer.scoring_dtype is None  # scoring stays fp32 by default
    distiller.iterate()
    assert all(torch.isfinite(p).all() for p in distiller.student.parameters())


@pytest.mark.parametrize(
    ("overrides", "dtype"), [((), torch.float32), (("speed.scoring=bf16",), torch.bfloat16)]
)
def test_the_selection_scores_in_the_scoring_precision(monkeypatch, overrides, dtype):
    """``scoring_logits`` is the selection's teacher forward (and the components benchmark's):
    fp32 by default on a bf16 CPU, bf16 with ``speed.scoring=bf16``."""
    monkeypatch.setattr(tadfkd.distillation.precision, "cpu_has_bf16", lambda: True)
    synthesizer = tiny_distiller(*overrides).synthesizer
    with torch.no_grad():
        views = synthesizer.views.test_view(synthesizer.sample(16))
    seen = []
    forward = synthesizer.scoring_logits
    monkeypatch.setattr(
        synthesizer, "scoring_logits", lambda v: seen.append(forward(v)) or seen[-1]
    )
    keep = synthesizer.score(views)
    assert keep.shape == (16,) and [logits.dtype for logits in seen] == [dtype]


def test_forcing_fp32_and_nchw_on_a_bf16_cpu_gives_the_published_computation(monkeypatch):
    monkeypatch.setattr(tadfkd.distillation.precision, "cpu_has_bf16", lambda: True)
    distiller = tiny_distiller("speed.precision=fp32", "speed.channels_last=false")
    assert distiller.precision.name == "fp32"
    assert distiller.synthesizer.generation_dtype is None
    assert not distiller.student.features[3].weight.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_generator_keeps_its_activations_channels_last():
    generator = small("bf16").synthesizer.generator
    seen = []
    generator.conv_blocks1[1].register_forward_pre_hook(  # its BatchNorm: by phase or not
        lambda module, inputs: seen.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        generator(torch.randn(8, NZ))
    assert seen == [True]


@pytest.mark.parametrize(
    ("channels_last", "dtype"),
    [(False, None), (True, None), (True, torch.bfloat16)],
)
def test_a_depthwise_output_convolution_computes_the_generators_images(channels_last, dtype):
    torch.manual_seed(0)
    generator = small().synthesizer.generator
    layout = torch.channels_last if channels_last else torch.contiguous_format
    generator = generator.to(memory_format=layout)
    calls = []
    generator.conv_blocks2[3].register_forward_hook(lambda *args: calls.append(1))
    noise = torch.randn(16, NZ)
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    generator.depthwise_output = False
    with torch.no_grad():
        published = generator(noise)  # fp32
    generator.load_state_dict(state)  # the train-mode forward moved the BN running statistics
    generator.depthwise_output = True
    with torch.no_grad(), tadfkd.distillation.precision.autocast_to("cpu", dtype):
        depthwise = generator(noise).float()
    # fp32: float rounding; bf16 autocast: within a bf16 step of images in [0, 1]
    tolerance = 1e-5 if dtype is None else 1e-2
    torch.testing.assert_close(depthwise, published, rtol=tolerance, atol=tolerance)
    assert calls == [1]  # the published forward only
    # with gradients the convolution itself runs (its backward is the faster one)
    generator(noise).sum().backward()
    assert calls == [1, 1]


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cpu", True), ("auto", "cuda", False), (False, "cpu", False), (True, "cuda", True)],
)
def test_the_depthwise_output_switch_is_on_for_the_cpu_when_auto(setting, device, expected):
    assert on_if_auto(setting, torch.device(device), "cpu") is expected


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        ("adaptive", "cpu", True),
        ("single", "cuda", False),
    ],
)
def test_the_refill_is_adaptive_on_cuda_and_one_batch_a_round_on_a_cpu_when_auto(
    setting, device, expected
):
    assert adaptive_refill(setting, torch.device(device)) is expected


def test_a_cpu_refill_generates_no_batch_beyond_the_one_that_fills_the_student_batch():
    synthesizer = small(batch_size=32).synthesizer  # speed.refill=auto, built on the CPU
    assert synthesizer.adaptive_rounds is False
    for _ in range(4):
        _, counters = synthesizer.student_batch()
        assert counters[schema.GENERATED] == 32 * counters[schema.BATCHES_USED]
    cfg = bench_config(["speed.refill=adaptive"])
    assert build_path(cfg, CPU, published=False, seed=0).synthesizer.adaptive_rounds is True


def test_the_builder_sets_the_generators_depthwise_output_from_the_switch():
    assert small().synthesizer.generator.depthwise_output is True  # auto, built on the CPU
    cfg = bench_config(["speed.depthwise_output=false"])
    generator = build_path(cfg, CPU, published=False, seed=0).synthesizer.generator
    assert generator.depthwise_output is False


def test_compiling_keeps_parameter_names_so_checkpoints_load_either_way():
    plain, compiled = tiny_distiller(), tiny_distiller("speed.compile=true")
    for name in ("student", "teacher"):
        assert list(getattr(compiled, name).state_dict()) == list(getattr(plain, name).state_dict())
    generator = compiled.synthesizer.generator
    assert list(generator.state_dict()) == list(plain.synthesizer.generator.state_dict())
    # the optimisers hold the very parameters of the (compiled-in-place) modules
    student_params = {id(p) for p in compiled.student.parameters()}
    assert {id(p) for p in compiled.student_optimizer.param_groups[0]["params"]} == student_params


def test_folded_teacher_gives_the_logits_of_the_teacher_to_float_rounding():
    for arch in sorted(ARCHITECTURES):
        torch.manual_seed(0)
        teacher = build_classifier(arch, 10, 3).eval()
        for module in teacher.modules():  # trained-like statistics, not the identity ones
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.5, 0.5)
        size = 64 if arch.startswith("tiny_") else 32
        example = torch.randn(2, 3, size, size)
        folded = fold_batchnorm(teacher, example)
        assert folded is not teacher, arch
        remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        # only a pre-activation net keeps the BN layers that follow an addition
        assert remaining == 0 or arch.startswith("wrn"), arch
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            reference, candidate = teacher(x), folded(x)
        scale = reference.abs().max()
        assert (candidate - reference).abs().max() <= 1e-5 * scale, arch
        assert teacher.training is False and any(
            isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()
        ), "the original teacher is not changed"


def test_a_trained_teacher_keeps_the_same_samples_folded_or_not():
    """The fold changes logits by float rounding: on the shipped digits teacher the kept sets of
    2048 generated samples agree on at least 99.9% (measured: all of them)."""
    masks = {}
    for fold in (False, True):
        synthesizer = small(batch_size=128, fold=fold).synthesizer
        synthesizer.teacher.load_state_dict(read_state_dict(DIGITS_TEACHER))
        if fold:
            synthesizer.inference_teacher = fold_batchnorm(
                synthesizer.teacher, torch.randn(2, 1, 16, 16)
            )
        torch.manual_seed(8)
        with torch.no_grad():
            images = torch.cat([synthesizer.generate(128) for _ in range(16)])
            masks[fold] = synthesizer.keep_mask(images)
    assert (masks[True] == masks[False]).float().mean() >= 0.999


def test_static_shapes_round_refill_rounds_up_to_powers_of_two():
    synthesizer = small(batch_size=100).synthesizer
    synthesizer.adaptive_rounds = synthesizer.bucket_rounds = True
    synthesizer.selection_rate = 0.4
    assert synthesizer.batches_per_round(100) == 4  # 3 needed
    synthesizer.selection_rate = 0.05
    assert synthesizer.batches_per_round(100) == 32  # 20 needed
    synthesizer.selection_rate = 1.0
    assert synthesizer.batches_per_round(100) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_channels_last_low_precision_steps_match_fp32(precision):
    paths = {name: small(name, 128, "cuda") for name in ("fp32", precision)}
    for distiller in paths.values():
        torch.manual_seed(7)
        distiller.meter.add(generator_step(distiller))
        distiller.student_step()
    for term in ("generator", "student"):
        value32 = float(paths["fp32"].meter.sums[f"loss/{term}"])
        assert float(paths[precision].meter.sums[f"loss/{term}"]) == pytest.approx(
            value32, rel=2e-2
        )
    student = paths[precision].student
    assert student.features[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_fp16_scales_the_loss_and_steps():
    precision = Precision("fp16", "cuda")
    model = torch.nn.Linear(4, 1).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with precision.autocast():
        loss = F.mse_loss(model(torch.randn(8, 4, device="cuda")), torch.zeros(8, 1, device="cuda"))
    precision.step(loss, optimizer, "student")
    assert not torch.equal(before, model.weight)
    assert set(precision.state_dict()) == {"student"}  # carried into checkpoints


def test_mode_switches_only_a_module_not_in_that_mode_already(monkeypatch):
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    with mode(net, "eval"):
        assert not any(module.training for module in net.modules())
    assert all(module.training for module in net.modules())

    def refuse(module, flag=True):
        raise AssertionError("train() was called")

    monkeypatch.setattr(nn.Module, "train", refuse)
    with mode(net, "train"):  # every submodule in train mode already: nothing is set
        assert all(module.training for module in net.modules())
    with pytest.raises(AssertionError, match="train\\(\\) was called"):
        with mode(net, "eval"):
            pass
    net[1].training = False  # one submodule in another mode: the whole module is switched
    with pytest.raises(AssertionError, match="train\\(\\) was called"):
        with mode(net, "train"):
            pass
