"""Forward hooks that record what the loss terms need, without changing any model's forward."""

from __future__ import annotations

import torch
from torch import nn


class BNStatistics:
    """Records, for every BatchNorm2d of a model, the mean and variance of its last input.

    ``loss()`` is DeepInversion's BN-statistics term summed over layers:
    ||running_var - var||_2 + ||running_mean - mean||_2, from the most recent forward.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self._terms: list[torch.Tensor | None] = [None] * len(self._layers)
        self._handles = [
            layer.register_forward_hook(self._hook(index))
            for index, layer in enumerate(self._layers)
        ]
        self.enabled = False

    def _hook(self, index: int):
        def record(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output) -> None:
            if not self.enabled:
                return
            x = inputs[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
            self._terms[index] = (module.running_var - var).norm() + (
                module.running_mean - mean
            ).norm()

        return record

    def loss(self) -> torch.Tensor:
        """Sum of the per-layer terms of the last forward run while enabled."""
        if any(term is None for term in self._terms):
            raise RuntimeError("BN statistics were not recorded: run the model forward first.")
        return torch.stack(self._terms).sum()

    def clear(self) -> None:
        self._terms = [None] * len(self._layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class LayerInputs:
    """Records the input of one module on each forward (e.g. the penultimate features)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._record)

    def _record(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        self.value = inputs[0]

    def remove(self) -> None:
        self._handle.remove()
