"""Numeric precision and memory layout of the training loop (speed settings, same computation).

``speed.precision=auto`` picks bf16 autocast where the hardware has bf16 units: on CUDA, and on
a CPU that reports AVX512-BF16 or AMX-BF16 (``cpu_has_bf16``, asked of torch at run time); fp32
elsewhere. Under autocast the convolutions and linear layers run in
the low precision; everything that decides or accumulates stays in fp32 or fp64: the loss terms
upcast their inputs (``losses``), the BN-statistics hooks upcast the layer inputs
(``recorders``), the mixture fit runs in fp64 (``selection``), and the weights and
optimiser states are fp32 (autocast never changes them).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tadfkd.base.errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16), as torch reports
    them; False where torch cannot tell (bf16 would then be emulated, slower than fp32)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA and on a CPU with bf16 units, ``fp32`` elsewhere; other
    names are checked and passed on."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
            return "bf16"
        return "fp32"
    if name not in DTYPES:
        raise UserError(f"speed.precision={name} is unknown; use auto, fp32, bf16 or fp16.")
    if name == "fp16" and device.type != "cuda":
        raise UserError("speed.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU.")
    return name


def autocast_to(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device_type`` ("cpu", "cuda"), or nothing when ``dtype`` is
    None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class Precision:
    """Autocast context for forward passes, and a backward + optimiser step that fits it.

    fp16 scales each loss with one ``GradScaler`` per optimiser, named by the caller (fp16
    gradients underflow otherwise), whose states ``state_dict`` carries into checkpoints; fp32
    and bf16 step plainly.
    """

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu") -> None:
        if name not in DTYPES:
            raise UserError(f"precision={name} is unknown; use fp32, bf16 or fp16.")
        self.name = name
        self.device_type = torch.device(device).type
        self.dtype = DTYPES[name]
        self._scalers: dict[str, torch.amp.GradScaler] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: autocast to ``dtype``, or nothing for fp32."""
        return autocast_to(self.device_type, self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, name: str) -> None:
        """``loss.backward()`` then ``optimizer.step()``; under fp16 loss-scaled by the
        scaler of optimiser ``name`` (e.g. "student")."""
        if self.name != "fp16":
            loss.backward()
            optimizer.step()
            return
        scaler = self._scaler(name)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def _scaler(self, name: str) -> torch.amp.GradScaler:
        if name not in self._scalers:
            self._scalers[name] = torch.amp.GradScaler(self.device_type)
        return self._scalers[name]

    def state_dict(self) -> dict[str, dict]:
        """The gradient scalers' states by optimiser name (empty unless fp16)."""
        return {name: scaler.state_dict() for name, scaler in self._scalers.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, scaler_state in state.items():
            self._scaler(name).load_state_dict(scaler_state)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False):
    """Move ``model`` to ``device``, channels-last when asked (the faster layout on CUDA)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
