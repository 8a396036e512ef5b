"""Per-epoch metrics: running sums of the steps' scalars, turned into the epoch's figures."""

from __future__ import annotations

from collections import defaultdict

import torch

from tadfkd.base import schema


class EpochMeter:
    """Running sums of scalar tensors and floats, read (one host synchronisation) at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (
                value.detach().float() if torch.is_tensor(value) else value
            )
            self.counts[name] += 1

    def epoch_metrics(self) -> dict[str, float]:
        """Means of the averaged metrics, totals of the counters (``schema.COUNTERS``, 0 when
        none happened) and the selection rate (kept / generated samples, 1 when none were)."""
        metrics = {
            name: float(total) / self.counts[name]
            for name, total in self.sums.items()
            if name not in schema.SUMMED
        }
        for counter in schema.COUNTERS:
            metrics[counter] = float(self.sums.get(counter, 0.0))
        generated = float(self.sums.get(schema.GENERATED, 0.0))
        kept = float(self.sums.get(schema.KEPT, 0.0))
        metrics[schema.SELECTION_RATE] = kept / generated if generated else 1.0
        return metrics

    def state_dict(self) -> dict[str, dict]:
        return {"meter_sums": dict(self.sums), "meter_counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, dict], device: torch.device) -> None:
        self.sums.clear()
        self.counts.clear()
        for name, total in state["meter_sums"].items():
            self.sums[name] = total.to(device) if torch.is_tensor(total) else total
        self.counts.update(state["meter_counts"])
