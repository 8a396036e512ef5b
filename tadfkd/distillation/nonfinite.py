"""What a NaN or infinite loss term does to a run: stop it, or skip the step and count it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tadfkd.base.errors import NonFiniteLoss, UserError

POLICIES = ("stop", "skip")


@dataclass
class _Step:
    """A checked step, kept until the next ``raise_if_nonfinite``: where it was, its terms'
    names, and their finiteness (a device tensor, never read before it is needed)."""

    kind: str
    names: list[str]
    epoch: int
    iteration: int
    finite: torch.Tensor


class NonFiniteGuard:
    """Checks every loss term of a step before its optimiser step.

    ``policy="stop"`` (default) keeps the checks on the device: ``raise_if_nonfinite``, which
    the loop calls at the end of each epoch and before any checkpoint, raises ``NonFiniteLoss``
    naming the first non-finite step, its terms and its position (so a non-finite epoch is never
    checkpointed and the last good checkpoint stays). ``"skip"`` tells the caller at once to
    skip the step (which counts it), at the cost of one host synchronisation per step.
    ``epoch`` and ``iteration`` (0-based) are kept up to date by the loop.
    """

    def __init__(self, policy: str = "stop") -> None:
        if policy not in POLICIES:
            raise UserError(f"runtime.on_nonfinite={policy} is unknown; use stop or skip.")
        self.policy = policy
        self.epoch = 0
        self.iteration = 0
        self._pending: list[_Step] = []

    def all_finite(self, step: str, terms: dict[str, torch.Tensor]) -> bool:
        """Whether the ``step`` ("student" or "generator") may take its optimiser step: under
        ``skip``, whether every tensor of ``terms`` is finite; under ``stop``, always (the check
        is read later, by ``raise_if_nonfinite``)."""
        names = [name for name, value in terms.items() if torch.is_tensor(value)]
        finite = torch.isfinite(torch.stack([terms[name].detach().float() for name in names]))
        if self.policy == "skip":
            return bool(finite.all())
        self._pending.append(_Step(step, names, self.epoch, self.iteration, finite))
        return True

    def raise_if_nonfinite(self) -> None:
        """Raise ``NonFiniteLoss`` for the first non-finite step checked since the last call
        (one host synchronisation), else forget the checked steps."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        good = torch.stack([step.finite.all() for step in pending])
        if bool(good.all()):
            return
        first = pending[good.tolist().index(False)]
        bad = [name for name, ok in zip(first.names, first.finite.tolist(), strict=True) if not ok]
        raise NonFiniteLoss(
            f"the {first.kind} loss became non-finite (term {', '.join(bad)}) at epoch "
            f"{first.epoch + 1}, iteration {first.iteration + 1}"
        )
