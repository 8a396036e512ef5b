"""The speed settings change how fast the loop runs, not what it computes (within tolerances).

Networks are the small benchmark setting (digits-sized, random weights); bf16 autocast runs on
the CPU too, so the precision checks need no GPU.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import tadfkd.distill
from tadfkd.bench import SMALL, build
from tadfkd.distill import Distiller
from tadfkd.errors import UserError
from tadfkd.precision import Precision, prepare_model, resolve_precision
from tadfkd.selection import fill_order

CPU = torch.device("cpu")


def small(precision: str = "fp32", batch_size: int = 64) -> Distiller:
    return build(replace(SMALL, batch_size=batch_size), CPU, precision, False, seed=0)


def feed_noise(distiller: Distiller, noise: list[torch.Tensor]) -> None:
    """Make ``distiller.generate`` consume ``noise`` batch by batch instead of drawing it."""
    queue = list(noise)
    distiller.generate = lambda n: distiller.generator(queue.pop(0))


def test_scoring_several_batches_together_keeps_exactly_what_one_at_a_time_keeps(monkeypatch):
    size = 64
    torch.manual_seed(1)
    noise = [torch.randn(size, SMALL.nz) for _ in range(12)]
    # The last batch's random subset uses the same draws in both paths.
    monkeypatch.setattr(
        tadfkd.distill,
        "fill_order",
        lambda keep, n: fill_order(keep, n, generator=torch.Generator().manual_seed(0)),
    )
    batches = {}
    for name in ("one at a time", "together"):
        distiller = small(batch_size=size)
        if name == "one at a time":  # the reference's refill: one batch, then decide
            distiller.batches_per_round = lambda needed: 1
        else:
            distiller.selection_rate = 0.1  # plans ~11 batches in one round: more than needed
        feed_noise(distiller, noise)
        torch.manual_seed(2)  # the train views' crop draws
        batches[name] = distiller.student_batch()
        used = distiller.meter.sums["selection/batches_used"]
        generated = distiller.meter.sums["selection/generated"] / size
        batches[name + " used"] = used
        assert generated >= used
    assert batches["together used"] == batches["one at a time used"] > 1
    torch.testing.assert_close(batches["together"], batches["one at a time"])


def test_the_generator_runs_once_per_batch_so_its_batch_norm_sees_one_batch():
    distiller = small(batch_size=32)
    distiller.selection_rate = 0.25
    seen = []
    distiller.generator.conv_blocks0[0].register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[0])
    )
    distiller.student_batch()
    assert len(seen) >= 2 and set(seen) == {32}


def test_the_refill_plans_rounds_from_the_last_selection_rate_within_the_bound():
    distiller = small(batch_size=100)
    assert distiller.batches_per_round(100) == 1  # no rate known yet
    distiller.selection_rate = 1.0
    assert distiller.batches_per_round(100) == 1
    distiller.selection_rate = 0.4
    assert distiller.batches_per_round(100) == 3
    assert distiller.batches_per_round(10) == 1
    distiller.selection_rate = 0.0
    assert distiller.batches_per_round(100) == distiller.selection.max_batches


def test_bf16_keeps_the_same_samples_as_fp32():
    # Generation and selection are never autocast, so the kept set cannot depend on precision.
    fp32, bf16 = small("fp32"), small("bf16")
    torch.manual_seed(3)
    with torch.no_grad():
        images = torch.cat([fp32.generate(64) for _ in range(4)])
    assert torch.equal(fp32.keep_mask(images), bf16.keep_mask(images))


def test_bf16_student_step_matches_fp32_within_tolerance():
    """Student L1 loss within 1% (relative) and the SGD update within 5% (relative norm)."""
    fp32, bf16 = small("fp32"), small("bf16")
    torch.manual_seed(4)
    with torch.no_grad():
        batch = fp32.views.train_view(fp32.generate(64))
    updates = {}
    for name, distiller in (("fp32", fp32), ("bf16", bf16)):
        distiller.student_batch = lambda: batch
        before = [p.detach().clone() for p in distiller.student.parameters()]
        distiller.student_step()
        updates[name] = torch.cat(
            [
                (p.detach() - b).flatten()
                for p, b in zip(distiller.student.parameters(), before, strict=True)
            ]
        )
    loss32, loss16 = fp32.meter.sums["loss/student"], bf16.meter.sums["loss/student"]
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    difference = (updates["bf16"] - updates["fp32"]).norm() / updates["fp32"].norm()
    assert difference < 5e-2


def test_bf16_generator_step_matches_fp32_within_tolerance():
    """Every loss term within 0.1% (relative) and the generator gradient within 1% (norm)."""
    fp32, bf16 = small("fp32"), small("bf16")
    for distiller in (fp32, bf16):
        torch.manual_seed(5)  # the same noise and views in both
        distiller.generator_step()
    for term in ("generator", "adversarial", "bn", "tv", "l2"):
        value32 = float(fp32.meter.sums[f"loss/{term}"])
        assert float(bf16.meter.sums[f"loss/{term}"]) == pytest.approx(value32, rel=1e-3)
    grads = {
        name: torch.cat([p.grad.flatten() for p in d.generator.parameters()])
        for name, d in (("fp32", fp32), ("bf16", bf16))
    }
    assert (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm() < 1e-2


def test_bn_statistics_hooks_record_fp32_under_autocast():
    distiller = small("bf16")
    torch.manual_seed(6)
    distiller.generator_step()
    assert distiller.bn_statistics.loss().dtype == torch.float32


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="precision=fp8 is unknown"):
        resolve_precision("fp8", CPU)


def test_prepare_model_keeps_parameter_names_when_compiling():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    keys = list(model.state_dict())
    assert list(prepare_model(model, CPU, compile=True).state_dict()) == keys


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_channels_last_low_precision_steps_match_fp32(precision):
    cuda = torch.device("cuda")
    paths = {name: build(SMALL, cuda, name, False, seed=0) for name in ("fp32", precision)}
    for distiller in paths.values():
        torch.manual_seed(7)
        distiller.generator_step()
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
    precision.step(loss, optimizer)
    assert not torch.equal(before, model.weight)
