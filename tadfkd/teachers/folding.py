"""A cheaper copy of the frozen teacher for its no-grad forwards (selection scoring, the student
steps' teacher logits, health signals): every BatchNorm that directly follows a convolution is
folded into that convolution's weights and bias, and replaced by an identity.

The generator step keeps the original teacher: its BN-statistics term needs the BN inputs, and
its gradient must flow through the BN layers. Folding changes the logits only by float rounding;
``fold_batchnorm`` checks that on an example batch and keeps the unfolded teacher otherwise.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# Folded logits may differ from the unfolded ones by this much, relative to their largest value.
FOLD_TOLERANCE = 1e-4


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, BN path) of every BatchNorm2d fed by a Conv2d whose output nothing else
    uses: read off the dataflow graph of ``torch.fx`` where the model traces, else (a forward
    that branches on the input's shape) off the nn.Sequential containers, where a BN right after
    a convolution is the only reader of its output."""
    modules = dict(model.named_modules())

    def kind(path: object) -> type | None:
        module = modules.get(path) if isinstance(path, str) else None
        return type(module) if module is not None else None

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except torch.fx.proxy.TraceError:
        return [
            (f"{path}.{index}", f"{path}.{index + 1}")
            for path, module in modules.items()
            if isinstance(module, nn.Sequential)
            for index in range(len(module) - 1)
            if isinstance(module[index], nn.Conv2d)
            and isinstance(module[index + 1], nn.BatchNorm2d)
        ]
    calls = [node.target for node in graph.nodes if node.op == "call_module"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not issubclass(kind(node.target) or object, nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = users[0].target
            if kind(bn) is nn.BatchNorm2d and calls.count(bn) == 1:
                pairs.append((node.target, bn))
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` with each conv -> BN pair of ``conv_bn_pairs`` folded into
    the conv (the BN replaced by ``nn.Identity``, so that the module paths stay); ``model``
    itself is not changed. If the folded copy's logits on ``example`` differ from ``model``'s by
    more than ``FOLD_TOLERANCE`` (relative), a warning says so and ``model`` is returned."""
    folded = copy.deepcopy(model).eval()
    for conv_path, bn_path in conv_bn_pairs(folded):
        conv, bn = folded.get_submodule(conv_path), folded.get_submodule(bn_path)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight, bias
        parent_path, _, name = bn_path.rpartition(".")
        setattr(folded.get_submodule(parent_path), name, nn.Identity())
    folded.requires_grad_(False)
    with torch.no_grad():
        reference, candidate = model(example), folded(example)
    scale = reference.abs().max().clamp_min(1e-12)
    if not (candidate - reference).abs().max() <= FOLD_TOLERANCE * scale:
        warnings.warn(
            f"folding BatchNorm into the convolutions of {type(model).__name__} changed its "
            "logits beyond float rounding; its no-grad forwards stay unfolded",
            stacklevel=2,
        )
        return model
    return folded
