"""The numbers of a report, as fractions: per method and accuracy the mean, sample std, 95%
interval, worst job, worst teacher and collapse rate; final accuracies by teacher; paired
differences between methods on the same teacher and seed.

A run *collapses* when its student accuracy is below ``collapse_below`` (default 0.5) times its
teacher's test accuracy: the student kept less than half of what the teacher knows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from tadfkd.analysis.jobs import Run
from tadfkd.base import schema

DEFAULT_COLLAPSE_BELOW = 0.5
# each accuracy of results.json as the report's tables name it
SHORT = {schema.FINAL_ACC: "final", schema.LAST_K_ACC: "last10", schema.BEST_ACC: "best"}


def methods_in_order(runs: Sequence[Run]) -> list[str]:
    """Methods in the order their first job appears."""
    return list(dict.fromkeys(run.method for run in runs))


def measured(runs: Sequence[Run], key: str) -> list[Run]:
    """The finished jobs whose ``key`` accuracy was measured (a test set was there)."""
    return [run for run in runs if run.status == "done" and run.accuracy(key) is not None]


def interval(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, sample standard deviation (ddof 1) and the half-width of the 95% confidence
    interval of the mean (Student's t); None where fewer than 2 values allow none."""
    if not values:
        return None, None, None
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float(array.mean()), None, None
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(array) - 1) * std / math.sqrt(len(array)))
    return float(array.mean()), std, half


def collapsed(run: Run, key: str, collapse_below: float) -> bool:
    """Whether the student's ``key`` accuracy is below ``collapse_below`` x the teacher's."""
    teacher = run.accuracy(schema.TEACHER_ACC_FIELD)
    return teacher is not None and run.accuracy(key) < collapse_below * teacher


def method_summary(runs: Sequence[Run], collapse_below: float) -> list[dict[str, Any]]:
    """Per method and accuracy: job counts, mean, sample std, 95% interval, worst job, worst
    teacher (lowest mean over its seeds) and collapse rate over every finished job (all
    teachers and seeds); fractions, None where nothing was measured."""
    rows = []
    for method in methods_in_order(runs):
        jobs = [run for run in runs if run.method == method]
        for key in schema.ACCURACY_FIELDS:
            rows.append(
                {
                    "method": method,
                    "accuracy": SHORT[key],
                    "jobs": len(jobs),
                    **_accuracy_summary(jobs, key, collapse_below),
                    "collapse_below": collapse_below,
                }
            )
    return rows


def _accuracy_summary(jobs: Sequence[Run], key: str, collapse_below: float) -> dict[str, Any]:
    """The counts and figures of one method's row for the ``key`` accuracy."""
    done = measured(jobs, key)
    values = [run.accuracy(key) for run in done]
    mean, std, half = interval(values)
    by_teacher: dict[str, list[float]] = {}
    for run in done:
        by_teacher.setdefault(run.teacher, []).append(run.accuracy(key))
    worst_teacher = min(by_teacher, key=lambda t: np.mean(by_teacher[t]), default=None)
    return {
        "n": len(done),
        "failed": sum(run.status in ("failed", "unreadable") for run in jobs),
        "running": sum(run.status == "running" for run in jobs),
        "mean": mean,
        "std": std,
        "ci95_low": None if half is None else mean - half,
        "ci95_high": None if half is None else mean + half,
        "worst": min(values, default=None),
        "worst_teacher": worst_teacher,
        "worst_teacher_mean": (
            float(np.mean(by_teacher[worst_teacher])) if worst_teacher else None
        ),
        "collapse_rate": (
            float(np.mean([collapsed(run, key, collapse_below) for run in done])) if done else None
        ),
    }


def teacher_table(runs: Sequence[Run]) -> dict[str, dict[str, list[float]]]:
    """Final accuracies of finished jobs by teacher, then method (fractions)."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in measured(runs, schema.FINAL_ACC):
        table.setdefault(run.teacher, {}).setdefault(run.method, []).append(
            run.accuracy(schema.FINAL_ACC)
        )
    return table


def paired_differences(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """For each pair of methods, the final accuracy of the first minus the second on the same
    teacher and seed: pairs, mean difference, sample std, 95% interval, and how often the first
    was better (fractions). The question users ask: is A better than B on the same teachers?"""
    finals = {
        (run.method, run.teacher, run.seed): run.accuracy(schema.FINAL_ACC)
        for run in measured(runs, schema.FINAL_ACC)
    }
    rows = []
    for first, second in combinations(methods_in_order(runs), 2):
        differences = [
            finals[first, teacher, seed] - finals[second, teacher, seed]
            for (method, teacher, seed) in finals
            if method == first and (second, teacher, seed) in finals
        ]
        mean, std, half = interval(differences)
        rows.append(
            {
                "first": first,
                "second": second,
                "pairs": len(differences),
                "mean_difference": mean,
                "std": std,
                "ci95_low": None if half is None else mean - half,
                "ci95_high": None if half is None else mean + half,
                "first_better": (
                    float(np.mean([d > 0 for d in differences])) if differences else None
                ),
            }
        )
    return rows
