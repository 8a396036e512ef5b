"""The finding of a report, in sentences at its top: which method is most robust across
teachers (highest mean, best worst teacher, lowest collapse rate), the paired differences that
exclude zero and those that do not, how far the best method is from the supervised ceiling and
from any published reference figure (``--reference NAME=FRACTION``), and how much the teacher
moves each method. Written from the numbers of ``statistics`` (final accuracies), never by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tadfkd.analysis.jobs import Run
from tadfkd.analysis.statistics import teacher_table
from tadfkd.base.errors import UserError
from tadfkd.run.results import percent


@dataclass(frozen=True)
class Reference:
    """A published figure to compare the best method with: its name and accuracy (fraction)."""

    name: str
    accuracy: float


def parse_reference(text: str) -> Reference:
    """``NAME=FRACTION`` (e.g. ``"ZSKD (Nayak et al. 2019)=0.7962"``) as a ``Reference``."""
    name, _, value = text.rpartition("=")
    try:
        accuracy = float(value)
    except ValueError:
        accuracy = math.nan
    if not name.strip() or not 0 <= accuracy <= 1:
        raise UserError(
            f"--reference {text!r} is not NAME=FRACTION with a fraction in [0, 1], e.g. "
            "--reference 'ZSKD=0.7962'."
        )
    return Reference(name.strip(), accuracy)


def pct(fraction: float | None) -> str:
    return percent(fraction, digits=1)


def points(difference: float) -> str:
    """A difference of fractions in signed percentage points, e.g. "+2.9"."""
    return f"{100 * difference:+.1f}"


def distance(difference: float) -> str:
    """A difference of fractions as "2.9 points above" or "2.9 points below"."""
    return f"{abs(100 * difference):.1f} points {'above' if difference > 0 else 'below'}"


def teacher_effect(runs: Sequence[Run]) -> dict[str, tuple[float, str, float, str, float]]:
    """Per method, over the teachers' mean final accuracies: (best - worst, worst teacher, its
    mean, best teacher, its mean); only methods measured on two teachers or more."""
    table = teacher_table(runs)
    effect = {}
    methods = dict.fromkeys(method for row in table.values() for method in row)
    for method in methods:
        means = {t: float(np.mean(row[method])) for t, row in table.items() if method in row}
        if len(means) < 2:
            continue
        worst, best = min(means, key=means.get), max(means, key=means.get)
        effect[method] = (means[best] - means[worst], worst, means[worst], best, means[best])
    return effect


def robustness_sentence(final: list[dict[str, Any]]) -> str:
    """Which method leads on mean, on worst teacher and on collapse rate (final accuracy);
    methods tied at the lowest collapse rate all lead on it."""
    ranked = sorted(final, key=lambda row: row["mean"], reverse=True)
    top_worst = max(final, key=lambda row: row["worst_teacher_mean"])
    fewest = min(row["collapse_rate"] for row in final)
    top_collapse = [row["method"] for row in final if row["collapse_rate"] == fewest]
    leader = ranked[0]["method"]
    head = (
        f"**Most robust across teachers: {leader}**, first on all three measures"
        if leader == top_worst["method"] and leader in top_collapse
        else "**No method leads on all three measures of robustness**"
    )
    means = ", ".join(f"{row['method']} {pct(row['mean'])}" for row in ranked)
    collapses = ", ".join(f"{row['method']} {pct(row['collapse_rate'])}" for row in final)
    return (
        f"- {head}: the mean over every teacher and seed ({means}); the worst teacher's mean "
        f"(best: {top_worst['method']}, {pct(top_worst['worst_teacher_mean'])} on "
        f"{top_worst['worst_teacher']}); the share of jobs collapsed (lowest: "
        f"{', '.join(top_collapse)}; {collapses})."
    )


def pairs_sentence(pairs: list[dict[str, Any]]) -> str | None:
    """The paired differences (final accuracy, 95% interval), those that exclude zero first."""
    rows = [row for row in pairs if row["ci95_low"] is not None]
    if not rows:
        return None

    def text(row: dict[str, Any]) -> str:
        return (
            f"{row['first']} - {row['second']} {points(row['mean_difference'])} "
            f"({points(row['ci95_low'])} to {points(row['ci95_high'])}, {row['pairs']} pairs)"
        )

    clear = [row for row in rows if row["ci95_low"] > 0 or row["ci95_high"] < 0]
    unclear = [row for row in rows if row not in clear]
    parts = []
    if clear:
        parts.append("the 95% interval excludes zero for " + "; ".join(map(text, clear)))
    if unclear:
        parts.append("it crosses zero for " + "; ".join(map(text, unclear)))
    return (
        "- Paired on the same teacher and seed (final accuracy, points): " + "; ".join(parts) + "."
    )


def gap_sentence(
    best: dict[str, Any], ceiling: dict[str, Any] | None, references: Sequence[Reference]
) -> str | None:
    """How far the best mean is from the supervised ceiling and the reference figures."""
    gaps = []
    if ceiling:
        gaps.append(
            f"{distance(best['mean'] - ceiling['test_acc'])} the student's supervised ceiling "
            f"({pct(ceiling['test_acc'])})"
        )
    gaps += [
        f"{distance(best['mean'] - ref.accuracy)} {ref.name} ({pct(ref.accuracy)})"
        for ref in references
    ]
    if not gaps:
        return None
    return (
        f"- The best mean ({best['method']}, {pct(best['mean'])}) is " + ", and ".join(gaps) + "."
    )


def effect_sentence(runs: Sequence[Run]) -> str | None:
    """How much the teacher moves each method (spread of its per-teacher means)."""
    effect = teacher_effect(runs)
    if not effect:
        return None
    parts = [
        f"{method} by {100 * spread:.1f} points ({worst} {pct(worst_mean)} to {best} "
        f"{pct(best_mean)})"
        for method, (spread, worst, worst_mean, best, best_mean) in effect.items()
    ]
    return (
        "- The teacher moves each method's mean final accuracy (worst to best teacher): "
        + "; ".join(parts)
        + "."
    )


def finding_lines(
    runs: Sequence[Run],
    summary: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    ceiling: dict[str, Any] | None,
    references: Sequence[Reference] = (),
) -> list[str]:
    """The report's "Finding" section (final accuracies); [] when no job finished."""
    final = [row for row in summary if row["accuracy"] == "final" and row["mean"] is not None]
    if not final:
        return []
    best = max(final, key=lambda row: row["mean"])
    sentences = [
        robustness_sentence(final),
        pairs_sentence(pairs),
        gap_sentence(best, ceiling, references),
        effect_sentence(runs),
    ]
    return ["", "## Finding (final accuracy, test set)", "", *filter(None, sentences)]
