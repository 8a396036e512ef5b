"""Forward hooks by module path (torchdistill-style): record what a loss term needs from inside a
network without changing any model's ``forward``.

    hooks = ForwardHooks(teacher)
    hooks.add("fc", record="input")            # the penultimate features
    teacher(x)
    features = hooks["fc"]

Each objective registers the hooks it needs in ``Objective.attach``; the loop never switches
them. A hook keeps only the most recent value per key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

# (module, recorded tensor) -> what to keep, or None to keep nothing
Transform = Callable[[nn.Module, torch.Tensor], Any]
# recorded tensor -> the key to keep it under (default: the module path)
KeyOf = Callable[[torch.Tensor], Hashable]


class ForwardHooks:
    """Forward hooks on the modules of one model, named by their module path."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: dict[Hashable, Any] = {}

    def add(
        self,
        path: str,
        record: str = "output",
        transform: Transform | None = None,
        key: KeyOf | None = None,
        with_grad_only: bool = False,
    ) -> None:
        """Record the module at ``path``'s ``record`` ("input": its first input; "output") on
        every forward, as ``transform(module, tensor)`` when given, under ``key(tensor)`` or
        ``path``. ``with_grad_only``: only forwards run with gradients enabled (the generator
        step's), not the no-grad scoring and student-step forwards."""
        if record not in ("input", "output"):
            raise ValueError(f"record={record!r}: use 'input' or 'output'")
        module = self.model.get_submodule(path)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if with_grad_only and not torch.is_grad_enabled():
                return
            value = inputs[0] if record == "input" else output
            if transform is not None:
                value = transform(module, value)
                if value is None:
                    return
            self.records[path if key is None else key(value)] = value

        module.register_forward_hook(hook)

    def __getitem__(self, key: Hashable) -> Any:
        if key not in self.records:
            raise RuntimeError(f"nothing was recorded at {key!r}: run the model forward first.")
        return self.records[key]

    def take(self) -> dict[Hashable, Any]:
        """Everything recorded since the last ``take``, emptying the records."""
        records, self.records = self.records, {}
        return records


def paths_of(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[str]:
    """Module paths of every submodule of ``model`` that is a ``kind``, in registration order."""
    return [name for name, module in model.named_modules() if name and isinstance(module, kind)]


def bn_statistics_term(module: nn.BatchNorm2d, inputs: torch.Tensor) -> torch.Tensor:
    """DeepInversion's term of one BatchNorm2d layer for its input batch (N, C, H, W):
    ||running_var - var||_2 + ||running_mean - mean||_2, per-channel biased statistics.

    The statistics are those of the published ``x.permute(1, 0, 2, 3).view(C, -1).var(1)``,
    computed over the (N*H*W, C) rows of the input instead: a view, not a copy, for a
    channels-last input, and two passes (mean, then mean squared deviation), without the
    transposed copy (equal up to float rounding, ``tests/test_losses.py``).
    """
    rows = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1]).float()
    mean = rows.mean(dim=0)
    var = (rows - mean).square().mean(dim=0)
    return (module.running_var - var).norm() + (module.running_mean - mean).norm()
