"""The report's two plots: ``curves.png`` (student test accuracy per epoch, one panel per
teacher, with chance level, teacher accuracy and the student's supervised ceiling) and
``health.png`` (final data-free health signals against final accuracy, coloured by teacher,
marker by method). matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tadfkd.analysis.jobs import Run, plain
from tadfkd.analysis.markdown import figure
from tadfkd.analysis.statistics import measured, methods_in_order
from tadfkd.base import schema


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Sequence[Run], path: Path, ceiling: dict[str, Any] | None) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    done = [run for run in runs if run.status == "done" and run.results.get(schema.EPOCH_ACCS)]
    teachers = sorted({run.teacher for run in done}) or ["(no finished job)"]
    methods = methods_in_order(done)
    colours = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    columns = min(3, len(teachers))
    rows = math.ceil(len(teachers) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False, sharey=True
    )
    for axis, teacher in zip(axes.flat, teachers, strict=False):
        teacher_runs = [run for run in done if run.teacher == teacher]
        for method in methods:
            curves = [
                [np.nan if a is None else 100 * a for a in run.results[schema.EPOCH_ACCS]]
                for run in teacher_runs
                if run.method == method
            ]
            for curve in curves:
                axis.plot(range(1, len(curve) + 1), curve, color=colours[method], lw=0.6, alpha=0.4)
            if curves:
                length = min(len(curve) for curve in curves)
                with warnings.catch_warnings():  # epochs no job measured stay blank
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean([curve[:length] for curve in curves], axis=0)
                axis.plot(range(1, length + 1), mean, color=colours[method], lw=2, label=method)
        if teacher_runs:
            reference_lines(axis, teacher_runs[0], ceiling)
            acc = teacher_runs[0].accuracy(schema.TEACHER_ACC_FIELD)
            axis.set_title(f"{teacher} (teacher {figure(acc)}%)", fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel("student test accuracy (%)")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(teachers) :]:
        axis.set_visible(False)
    if methods:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reference_lines(axis, run: Run, ceiling: dict[str, Any] | None) -> None:
    """Chance level, the teacher's accuracy and the supervised ceiling on a curves panel."""
    classes = plain((run.config.get("dataset") or {}).get("num_classes"))
    if isinstance(classes, int) and classes > 0:
        axis.axhline(100 / classes, color="grey", ls=":", lw=1, label="chance")
    teacher = run.accuracy(schema.TEACHER_ACC_FIELD)
    if teacher is not None:
        axis.axhline(100 * teacher, color="black", ls="--", lw=1, label="teacher")
    if ceiling:
        axis.axhline(100 * ceiling["test_acc"], color="black", ls="-.", lw=1, label="ceiling")


def plot_health(runs: Sequence[Run], path: Path) -> None:
    plt = _pyplot()
    done = measured(runs, schema.FINAL_ACC)
    teachers = sorted({run.teacher for run in done})
    methods = methods_in_order(done)
    markers = "osD^vP*Xh<>"
    fig, axes = plt.subplots(
        1, len(schema.HEALTH), figsize=(4 * len(schema.HEALTH), 3.6), sharey=True
    )
    for axis, (key, label) in zip(axes, schema.HEALTH.items(), strict=True):
        for t_index, teacher in enumerate(teachers):
            for m_index, method in enumerate(methods):
                points = [
                    (run.final_health[key], 100 * run.accuracy(schema.FINAL_ACC))
                    for run in done
                    if run.teacher == teacher and run.method == method and key in run.final_health
                ]
                if points:
                    x, y = zip(*points, strict=True)
                    axis.scatter(
                        x,
                        y,
                        s=18,
                        color=f"C{t_index % 10}",
                        marker=markers[m_index % len(markers)],
                        alpha=0.8,
                    )
        axis.set_xlabel(label, fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("final student test accuracy (%)")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=f"C{i % 10}", label=t)
        for i, t in enumerate(teachers)
    ] + [
        plt.Line2D([], [], ls="", marker=markers[i % len(markers)], color="grey", label=m)
        for i, m in enumerate(methods)
    ]
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
