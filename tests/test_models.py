"""Architectures: parameter names and shapes of the published checkpoints, forward shapes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.distillation.objectives import stage_ends
from tadfkd.models import ARCHITECTURES, Generator, build_classifier, classifier_layer

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name in BN]


def natural_input(arch: str) -> tuple[int, int, int]:
    """(num_classes, in_channels, image size) each architecture is made for."""
    if arch.startswith("digits"):
        return 10, 1, 16
    if arch.startswith("tiny"):
        return 200, 3, 64
    return 10, 3, 32


def published_resnet_keys(
    num_blocks: list[int], projection: str, stem_bias: bool, head: str
) -> list[str]:
    """State-dict keys of the published ResNets, derived from their layout rules."""
    keys = ["conv1.weight"] + (["conv1.bias"] if stem_bias else []) + bn_keys("bn1")
    in_planes = 64
    for stage, (blocks, planes) in enumerate(
        zip(num_blocks, (64, 128, 256, 512), strict=True), start=1
    ):
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            block = f"layer{stage}.{index}"
            keys += [f"{block}.conv1.weight", *bn_keys(f"{block}.bn1")]
            keys += [f"{block}.conv2.weight", *bn_keys(f"{block}.bn2")]
            if stride != 1 or in_planes != planes:
                keys += [f"{block}.{projection}.0.weight", *bn_keys(f"{block}.{projection}.1")]
            in_planes = planes
    return keys + [f"{head}.weight", f"{head}.bias"]


def cmi_wrn_keys(depth: int, widen: int) -> list[str]:
    """State-dict keys of the CMI zoo's `wresnet.py`, in its order."""
    n = (depth - 4) // 6
    channels = [16, 16 * widen, 32 * widen, 64 * widen]
    keys = ["conv1.weight"]
    for group in range(1, 4):
        for index in range(n):
            in_planes = channels[group - 1] if index == 0 else channels[group]
            block = f"block{group}.layer.{index}"
            keys += [*bn_keys(f"{block}.bn1"), f"{block}.conv1.weight"]
            keys += [*bn_keys(f"{block}.bn2"), f"{block}.conv2.weight"]
            if in_planes != channels[group]:
                keys.append(f"{block}.convShortcut.weight")
    return keys + bn_keys("bn1") + ["fc.weight", "fc.bias"]


def cmi_vgg_keys(groups: list[list[int]]) -> list[str]:
    """State-dict keys of the CMI zoo's `vgg*_bn` (conv with bias, BN, ReLU per layer)."""
    keys = []
    for group, widths in enumerate(groups):
        for index in range(len(widths)):
            keys += [f"block{group}.{3 * index}.weight", f"block{group}.{3 * index}.bias"]
            keys += bn_keys(f"block{group}.{3 * index + 1}")
    return keys + ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize(
    ("arch", "num_blocks"), [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])]
)
def test_cifar_resnet_keys_match_published(arch, num_blocks):
    state = build_classifier(arch, 10).state_dict()
    assert list(state) == published_resnet_keys(num_blocks, "shortcut", False, "linear")
    assert len(state) == {"resnet18": 122, "resnet34": 218}[arch]
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert "conv1.bias" not in state
    assert "layer1.0.shortcut.0.weight" not in state
    assert state["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.0.shortcut.1.running_var"].shape == (512,)
    assert state["linear.weight"].shape == (10, 512)


def test_cifar_resnet_parameter_counts():
    counts = {
        arch: sum(p.numel() for p in build_classifier(arch, 10).parameters())
        for arch in ("resnet18", "resnet34")
    }
    assert counts == {"resnet18": 11_173_962, "resnet34": 21_282_122}


def test_cifar_resnet_forward_matches_published_4x4_pool():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = F.relu(model.bn1(model.conv1(x)))
        out = model.layer4(model.layer3(model.layer2(model.layer1(out))))
        published = model.linear(F.avg_pool2d(out, 4).flatten(1))
        assert torch.allclose(model(x), published, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "num_blocks"), [("tiny_resnet18", [2, 2, 2, 2]), ("tiny_resnet34", [3, 4, 6, 3])]
)
def test_tiny_resnet_keys_match_published(arch, num_blocks):
    model = build_classifier(arch, 200)
    state = model.state_dict()
    assert list(state) == published_resnet_keys(num_blocks, "downsample", True, "fc")
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == num_blocks
    assert state["conv1.bias"].shape == (64,)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert not any("shortcut" in key for key in state)
    assert state["fc.weight"].shape == (200, 512)


@pytest.mark.parametrize(
    ("arch", "depth", "widen", "count"),
    [
        ("wrn16_1", 16, 1, 82),
        ("wrn16_2", 16, 2, 83),
        ("wrn40_1", 40, 1, 226),
        ("wrn40_2", 40, 2, 227),
    ],
)
def test_wrn_keys_match_cmi_zoo(arch, depth, widen, count):
    state = build_classifier(arch, 10).state_dict()
    assert list(state) == cmi_wrn_keys(depth, widen)
    assert len(state) == count
    assert state["conv1.weight"].shape == (16, 3, 3, 3)
    assert state["block2.layer.0.convShortcut.weight"].shape == (32 * widen, 16 * widen, 1, 1)
    assert state["block1.layer.0.bn1.weight"].shape == (16,)
    assert state["bn1.weight"].shape == (64 * widen,)
    assert state["fc.weight"].shape == (10, 64 * widen)
    assert ("block1.layer.0.convShortcut.weight" in state) == (widen != 1)


@pytest.mark.parametrize(
    ("arch", "groups"),
    [
        ("vgg8", [[64], [128], [256], [512], [512]]),
        ("vgg11", [[64], [128], [256, 256], [512, 512], [512, 512]]),
    ],
)
def test_vgg_keys_match_cmi_zoo(arch, groups):
    state = build_classifier(arch, 100).state_dict()
    assert list(state) == cmi_vgg_keys(groups)
    assert state["block0.0.weight"].shape == (64, 3, 3, 3)
    assert state["block0.0.bias"].shape == (64,)
    assert state["block4.1.running_mean"].shape == (512,)
    assert state["classifier.weight"].shape == (100, 512)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_shape_at_natural_size(arch):
    num_classes, channels, size = natural_input(arch)
    model = build_classifier(arch, num_classes, channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, num_classes)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_classifier_layer_is_the_head(arch):
    num_classes, channels, _ = natural_input(arch)
    model = build_classifier(arch, num_classes, channels)
    head = classifier_layer(model)
    names = [name for name, module in model.named_modules() if module is head]
    assert names[0] in {"linear", "fc", "classifier"}
    assert head.out_features == num_classes


@pytest.mark.parametrize("arch", sorted(a for a in ARCHITECTURES if a.startswith("digits")))
@pytest.mark.parametrize("size", [8, 12, 16, 32])
def test_digits_models_take_any_size_divisible_by_4(arch, size):
    model = build_classifier(arch, 10, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, size, size)).shape == (3, 10)


def vgg_published_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The zoo's VGG forward: each max pool after its ReLU."""
    out = model.pool0(F.relu(model.block0(x)))
    out = model.pool1(F.relu(model.block1(out)))
    out = model.pool2(F.relu(model.block2(out)))
    out = F.relu(model.block3(out))
    if x.shape[-1] >= 64:
        out = model.pool3(out)
    out = model.pool4(F.relu(model.block4(out)))
    return model.classifier(out.flatten(1))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vgg_pooling_before_the_relu_computes_the_published_values_and_gradients(size, dtype):
    torch.manual_seed(0)
    model = build_classifier("vgg8", 10, 3).train().to(memory_format=torch.channels_last)
    published = copy.deepcopy(model)
    x = torch.randn(4, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours, theirs = model(x), vgg_published_forward(published, x)
    ours.float().square().sum().backward()
    theirs.float().square().sum().backward()
    assert torch.equal(ours, theirs)
    for (name, mine), reference in zip(
        model.named_parameters(), published.parameters(), strict=True
    ):
        assert torch.equal(mine.grad, reference.grad), name


def test_vgg_pooling_before_the_relu_leaves_the_stage_ends_unchanged():
    """ZSKT's attention maps are the last module output at each resolution (``stage_ends``):
    the pool outputs, which now precede the ReLU, are never one."""
    torch.manual_seed(0)
    model = build_classifier("vgg8", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    for name in ("ours", "published"):
        network = copy.deepcopy(model)
        stages = stage_ends(network)
        with torch.no_grad():
            network(x) if name == "ours" else vgg_published_forward(network, x)
        maps[name] = stages.take()
    assert maps["ours"].keys() == maps["published"].keys() and len(maps["ours"]) >= 3
    for size, tensor in maps["ours"].items():
        assert torch.equal(tensor, maps["published"][size]), size


def test_in_channels_changes_only_the_stem():
    state = build_classifier("resnet18", 10, in_channels=1).state_dict()
    assert state["conv1.weight"].shape == (64, 1, 3, 3)
    assert build_classifier("wrn16_1", 10, 1).state_dict()["conv1.weight"].shape == (16, 1, 3, 3)
    assert build_classifier("vgg8", 10, 1).state_dict()["block0.0.weight"].shape == (64, 1, 3, 3)


def test_unknown_architecture_lists_known_names():
    with pytest.raises(UserError, match="unknown architecture 'resnet999'") as error:
        build_classifier("resnet999", 10)
    assert "resnet18" in str(error.value) and "wrn40_2" in str(error.value)


GENERATOR_KEYS = [
    "l1.weight",
    "l1.bias",
    *bn_keys("conv_blocks0.0"),
    "conv_blocks1.0.weight",
    "conv_blocks1.0.bias",
    *bn_keys("conv_blocks1.1"),
    "conv_blocks2.0.weight",
    "conv_blocks2.0.bias",
    *bn_keys("conv_blocks2.1"),
    "conv_blocks2.3.weight",
    "conv_blocks2.3.bias",
]


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_keys_shapes_and_range(size, channels):
    generator = Generator(nz=100, img_size=size, channels=channels)
    state = generator.state_dict()
    assert list(state) == GENERATOR_KEYS
    assert state["l1.weight"].shape == (128 * (size // 4) ** 2, 100)
    assert state["conv_blocks2.3.weight"].shape == (channels, 64, 3, 3)
    images = generator(torch.randn(4, 100))
    assert images.shape == (4, channels, size, size)
    assert images.min() >= 0 and images.max() <= 1


def test_generator_keeps_dafl_quirks():
    generator = Generator()
    assert generator.l1.in_features == 1000
    # DAFL's positional 0.8 lands in eps; the first BN keeps the default.
    assert generator.conv_blocks1[1].eps == 0.8 and generator.conv_blocks2[1].eps == 0.8
    assert generator.conv_blocks0[0].eps == 1e-5
    assert sum(isinstance(m, nn.LeakyReLU) for m in generator.modules()) == 3
    assert isinstance(generator.conv_blocks2[-1], nn.Sigmoid)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_generators_in_place_leaky_relus_change_no_value_or_gradient(channels_last):
    # in place, as DAFL's: BatchNorm's backward reads its input, never the output they overwrite
    torch.manual_seed(0)
    generator = Generator(nz=16, img_size=16, channels=3, width=16)
    assert all(m.inplace for m in generator.modules() if isinstance(m, nn.LeakyReLU))
    out_of_place = copy.deepcopy(generator)
    for module in out_of_place.modules():
        if isinstance(module, nn.LeakyReLU):
            module.inplace = False
    if channels_last:
        generator, out_of_place = (
            g.to(memory_format=torch.channels_last) for g in (generator, out_of_place)
        )
    z = torch.randn(8, 16)
    for network in (generator, out_of_place):
        (network(z) ** 2).mean().backward()
    torch.testing.assert_close(generator(z), out_of_place(z), rtol=0, atol=0)
    for (name, a), b in zip(generator.named_parameters(), out_of_place.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_generator_rejects_size_not_divisible_by_4():
    with pytest.raises(UserError, match="img_size=30 is not divisible by 4"):
        Generator(img_size=30)
