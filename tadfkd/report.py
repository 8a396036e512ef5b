"""Report over a sweep: ``python -m tadfkd.report <sweep dir | W&B group> [--out DIR]``.

Reads every job of a sweep (the ``results.json`` / ``failed.json`` of each run directory under a
sweep directory, or the runs of a W&B group through the public API) and writes ``report.md``
(percent), ``report.csv`` (per method and accuracy, fractions), ``runs.csv`` (per job, fractions)
and two plots: ``curves.png`` (student test accuracy per epoch, one panel per teacher) and
``health.png`` (final data-free health signals against final accuracy). Partial sweeps are fine:
jobs still running and failed jobs are counted and listed.

A run *collapses* when its student accuracy is below ``--collapse-below`` (default 0.5) times its
teacher's test accuracy: the student kept less than half of what the teacher knows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from tadfkd.errors import UserError
from tadfkd.results import FAILED_FILE, RESULTS_FILE, run_status

# results.json key -> how the report names it
ACCURACIES = {
    "student_final_acc": "final",
    "student_last10_acc": "mean of last 10 epochs",
    "student_best_acc": "best epoch (test-set selection)",
}
SHORT = {"student_final_acc": "final", "student_last10_acc": "last10", "student_best_acc": "best"}
# final-epoch data-free health signals (fractions) plotted against final accuracy
HEALTH = {
    "health/teacher_class_entropy": "teacher class entropy (fraction of log K)",
    "health/teacher_confidence": "teacher confidence (mean max probability)",
    "health/agreement": "teacher-student agreement (fraction)",
    "selection/rate": "selection rate (fraction kept)",
}
DEFAULT_COLLAPSE_BELOW = 0.5


@dataclass
class Run:
    """One job of a sweep; ``results`` holds its results.json (empty unless done)."""

    name: str
    status: str  # done, failed or running
    method: str = "?"
    teacher: str = "?"
    student: str = "?"
    dataset: str = "?"
    seed: int | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def final_health(self) -> dict[str, float]:
        """Health signals of the last recorded epoch (empty when there is no history)."""
        history = self.results.get("history") or []
        last = history[-1] if history else {}
        return {key: float(last[key]) for key in HEALTH if key in last}


# -- reading ------------------------------------------------------------------------------------
def _job_order(path: Path) -> list[Any]:
    """Natural order of run directory names (``2_...`` before ``10_...``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_run_directory(run_dir: Path) -> Run:
    """One run directory: its status, labels (from results.json or .hydra/config.yaml), error."""
    run = Run(name=run_dir.name, status=run_status(run_dir))
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.exists():
        config = OmegaConf.load(config_file)
        run.method = str(OmegaConf.select(config, "method.name", default="?"))
        run.teacher = str(OmegaConf.select(config, "teacher.name", default="?"))
        run.student = str(OmegaConf.select(config, "student.arch", default="?"))
        run.dataset = str(OmegaConf.select(config, "dataset.name", default="?"))
        seed = OmegaConf.select(config, "seed", default=None)
        run.seed = None if seed is None else int(seed)
    if run.status == "done":
        run.results = json.loads((run_dir / RESULTS_FILE).read_text())
        run.method, run.teacher = run.results["method"], run.results["teacher"]
        run.student, run.dataset = run.results["student"], run.results["dataset"]
        run.seed = int(run.results["seed"])
    elif run.status == "failed":
        failure = json.loads((run_dir / FAILED_FILE).read_text())
        run.error = f"{failure.get('error_type', 'Error')}: {failure.get('error', '')}"
    return run


def read_sweep_directory(sweep_dir: Path) -> list[Run]:
    """Every job under a sweep directory: each folder holding ``.hydra/`` or a results file."""
    markers = [*sweep_dir.rglob(".hydra"), *sweep_dir.rglob(RESULTS_FILE)]
    markers += list(sweep_dir.rglob(FAILED_FILE))
    run_dirs = {marker.parent for marker in markers if ".submitit" not in marker.parts}
    if not run_dirs:
        raise UserError(
            f"{sweep_dir} holds no run directories (none with .hydra/ or {RESULTS_FILE}); "
            "pass the sweep directory that `python run.py -m` printed."
        )
    return [read_run_directory(run_dir) for run_dir in sorted(run_dirs, key=_job_order)]


def read_wandb_group(group: str, project: str, entity: str | None) -> list[Run]:
    """Every run of a W&B group, through the public API (needs network and WANDB_API_KEY)."""
    try:
        import wandb

        api = wandb.Api(timeout=60)
        path = f"{entity or api.default_entity}/{project}"
        wandb_runs = list(api.runs(path, filters={"group": group}))
    except Exception as error:  # noqa: BLE001 - any API failure becomes one sentence
        raise UserError(
            f"could not read W&B group {group!r} of project {project!r} "
            f"({type(error).__name__}: {error}); check the network, WANDB_API_KEY and "
            "--entity/--project, or pass a sweep directory instead."
        ) from error
    if not wandb_runs:
        raise UserError(f"W&B project {path} has no runs in group {group!r}.")
    runs = []
    for wandb_run in wandb_runs:
        summary = dict(wandb_run.summary)
        config = wandb_run.config
        done = wandb_run.state == "finished" and "student_final_acc" in summary
        status = "done" if done else ("running" if wandb_run.state == "running" else "failed")
        run = Run(
            name=wandb_run.name,
            status=status,
            method=str(summary.get("method", config.get("method", {}).get("name", "?"))),
            teacher=str(summary.get("teacher", config.get("teacher", {}).get("name", "?"))),
            student=str(summary.get("student", config.get("student", {}).get("arch", "?"))),
            dataset=str(summary.get("dataset", config.get("dataset", {}).get("name", "?"))),
            seed=config.get("seed"),
            error=None if status != "failed" else f"W&B state {wandb_run.state}",
        )
        if done:
            rows = list(wandb_run.scan_history(keys=["acc/student", *HEALTH]))
            run.results = {
                **summary,
                "epoch_accs": [row["acc/student"] for row in rows],
                "history": rows,
            }
        runs.append(run)
    return runs


# -- numbers ------------------------------------------------------------------------------------
def methods_in_order(runs: Sequence[Run]) -> list[str]:
    """Methods in the order their first job appears."""
    return list(dict.fromkeys(run.method for run in runs))


def collapsed(run: Run, key: str, collapse_below: float) -> bool:
    """Whether the student's ``key`` accuracy is below ``collapse_below`` x the teacher's."""
    return run.results[key] < collapse_below * run.results["teacher_acc"]


def method_summary(runs: Sequence[Run], collapse_below: float) -> list[dict[str, Any]]:
    """Per method and accuracy: job counts, mean, std (ddof 0), worst and collapse rate over
    every finished job (all teachers and seeds); fractions, None where no job has finished."""
    rows = []
    for method in methods_in_order(runs):
        jobs = [run for run in runs if run.method == method]
        done = [run for run in jobs if run.status == "done"]
        for key, label in ACCURACIES.items():
            values = np.array([run.results[key] for run in done], dtype=float)
            rows.append(
                {
                    "method": method,
                    "accuracy": SHORT[key],
                    "description": label,
                    "jobs": len(jobs),
                    "done": len(done),
                    "failed": sum(run.status == "failed" for run in jobs),
                    "running": sum(run.status == "running" for run in jobs),
                    "mean": float(values.mean()) if done else None,
                    "std": float(values.std()) if done else None,
                    "worst": float(values.min()) if done else None,
                    "collapse_rate": (
                        float(np.mean([collapsed(run, key, collapse_below) for run in done]))
                        if done
                        else None
                    ),
                    "collapse_below": collapse_below,
                }
            )
    return rows


def teacher_table(runs: Sequence[Run]) -> dict[str, dict[str, list[float]]]:
    """Final accuracies of finished jobs by teacher, then method (fractions)."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run.status == "done":
            table.setdefault(run.teacher, {}).setdefault(run.method, []).append(
                run.results["student_final_acc"]
            )
    return table


# -- writing ------------------------------------------------------------------------------------
def percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def write_csvs(runs: Sequence[Run], summary: list[dict[str, Any]], out: Path) -> None:
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    fields = ["job", "status", "dataset", "teacher", "student", "method", "seed", "teacher_acc"]
    fields += [*ACCURACIES, *HEALTH, "wall_time_s", "error"]
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            row = {
                "job": run.name,
                "status": run.status,
                "dataset": run.dataset,
                "teacher": run.teacher,
                "student": run.student,
                "method": run.method,
                "seed": run.seed,
                "error": run.error,
                **{key: run.results.get(key) for key in (*ACCURACIES, "teacher_acc")},
                "wall_time_s": run.results.get("wall_time_s"),
                **run.final_health,
            }
            writer.writerow(row)


def markdown(
    source: str, runs: Sequence[Run], summary: list[dict[str, Any]], collapse_below: float
) -> str:
    done = [run for run in runs if run.status == "done"]
    failed = [run for run in runs if run.status == "failed"]
    running = [run for run in runs if run.status == "running"]
    teacher_acc = {run.teacher: run.results["teacher_acc"] for run in done}
    methods = methods_in_order(runs)
    lines = [
        f"# Sweep report: {Path(source).name or source}",
        "",
        f"Source: `{source}`. {len(runs)} jobs: {len(done)} done, {len(failed)} failed, "
        f"{len(running)} running or unfinished.",
    ]
    if failed or running:
        lines.append(
            "**Partial sweep**: the numbers below cover the finished jobs only; failed and "
            "unfinished jobs are listed at the end (jobs not started yet have no run directory "
            "and are not counted)."
        )
    lines += [
        "",
        "All accuracies are student test-set accuracies in percent, over every finished job of "
        "a method (all teachers and seeds). *final*: after the last epoch. *last 10*: mean of "
        "the last 10 per-epoch evaluations (of all of them when a run is shorter). *best*: the "
        "best epoch, chosen on the test set itself, so optimistic (reported only for comparison "
        "with published numbers). std: standard deviation over jobs (ddof 0). worst: lowest job. "
        f"collapse: share of jobs whose student is below {100 * collapse_below:.0f}% of its "
        "teacher's test accuracy.",
        "",
        "## Per method, across teachers and seeds",
        "",
        "| method | done / jobs | failed | accuracy | mean ± std (%) | worst (%) | collapse (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['method']} | {row['done']} / {row['jobs']} | {row['failed']} | "
            f"{row['accuracy']} | {percent(row['mean'])} ± {percent(row['std'])} | "
            f"{percent(row['worst'])} | {percent(row['collapse_rate'], 0)} |"
        )
    table = teacher_table(runs)
    lines += [
        "",
        "## Final accuracy per teacher (mean ± std over seeds, %)",
        "",
        "| teacher | teacher acc (%) | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for teacher in sorted(table):
        cells = []
        for method in methods:
            values = table[teacher].get(method, [])
            cells.append(
                f"{percent(float(np.mean(values)))} ± {percent(float(np.std(values)))} "
                f"(n={len(values)})"
                if values
                else "n/a"
            )
        lines.append(f"| {teacher} | {percent(teacher_acc[teacher])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Plots",
        "",
        "Student test accuracy per epoch, one panel per teacher (thin: seeds; thick: mean):",
        "",
        "![accuracy curves](curves.png)",
        "",
        "Final-epoch data-free health signals (computed on generated samples only) against "
        "final accuracy:",
        "",
        "![health signals](health.png)",
    ]
    if failed:
        lines += ["", "## Failed jobs", "", "| job | method | teacher | seed | error |"]
        lines.append("|---|---|---|---|---|")
        for run in failed:
            error = (run.error or "").replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {run.name} | {run.method} | {run.teacher} | {run.seed} | {error} |")
    if running:
        lines += ["", "## Running or unfinished jobs", ""]
        lines += [f"- {run.name} ({run.method}, {run.teacher}, seed {run.seed})" for run in running]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in runs if run.status == "done"]
    teachers = sorted({run.teacher for run in done}) or ["(no finished job)"]
    methods = methods_in_order(done)
    colours = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    columns = min(3, len(teachers))
    rows = math.ceil(len(teachers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False, sharey=True
    )
    for axis, teacher in zip(axes.flat, teachers, strict=False):
        teacher_runs = [run for run in done if run.teacher == teacher]
        for method in methods:
            curves = [run.results["epoch_accs"] for run in teacher_runs if run.method == method]
            for curve in curves:
                epochs = np.arange(1, len(curve) + 1)
                axis.plot(epochs, 100 * np.array(curve), color=colours[method], lw=0.6, alpha=0.4)
            if curves:
                length = min(len(curve) for curve in curves)
                mean = np.mean([curve[:length] for curve in curves], axis=0)
                epochs = np.arange(1, length + 1)
                axis.plot(epochs, 100 * mean, color=colours[method], lw=2, label=method)
        if teacher_runs:
            acc = teacher_runs[0].results["teacher_acc"]
            axis.set_title(f"{teacher} (teacher {100 * acc:.1f}%)", fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylabel("student test accuracy (%)")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(teachers) :]:
        axis.set_visible(False)
    if methods:
        axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_health(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in runs if run.status == "done"]
    methods = methods_in_order(done)
    figure, axes = plt.subplots(1, len(HEALTH), figsize=(4 * len(HEALTH), 3.4), sharey=True)
    for axis, (key, label) in zip(axes, HEALTH.items(), strict=True):
        for index, method in enumerate(methods):
            points = [
                (run.final_health[key], 100 * run.results["student_final_acc"])
                for run in done
                if run.method == method and key in run.final_health
            ]
            if points:
                x, y = zip(*points, strict=True)
                axis.scatter(x, y, s=16, color=f"C{index % 10}", label=method, alpha=0.8)
        axis.set_xlabel(label, fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("final student test accuracy (%)")
    labelled = [axis for axis in axes if axis.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    runs: Sequence[Run], source: str, out: Path, collapse_below: float = DEFAULT_COLLAPSE_BELOW
) -> list[dict[str, Any]]:
    """Write report.md, report.csv, runs.csv, curves.png and health.png into ``out``; returns
    the per-method summary rows (fractions)."""
    if not 0 < collapse_below <= 1:
        raise UserError(f"--collapse-below={collapse_below} must be a fraction in (0, 1].")
    out.mkdir(parents=True, exist_ok=True)
    summary = method_summary(runs, collapse_below)
    write_csvs(runs, summary, out)
    (out / "report.md").write_text(markdown(source, runs, summary, collapse_below))
    plot_curves(runs, out / "curves.png")
    plot_health(runs, out / "health.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.report",
        description="Summarise a sweep (a sweep directory, or a W&B group) into report.md, "
        "report.csv, runs.csv and plots.",
    )
    parser.add_argument("source", help="sweep directory (multirun/...), or a W&B group name")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: the sweep directory, or reports/<group>)"
    )
    parser.add_argument(
        "--collapse-below",
        type=float,
        default=DEFAULT_COLLAPSE_BELOW,
        help="a job collapses when its student is below this fraction of its teacher's accuracy",
    )
    parser.add_argument("--project", default="tadfkd", help="W&B project (W&B groups only)")
    parser.add_argument("--entity", default=None, help="W&B entity (W&B groups only)")
    args = parser.parse_args(argv)
    try:
        source = Path(args.source)
        if source.is_dir():
            runs = read_sweep_directory(source)
            out = args.out or source
        else:
            runs = read_wandb_group(args.source, args.project, args.entity)
            out = args.out or Path("reports") / args.source
        write_report(runs, args.source, out, args.collapse_below)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    done = sum(run.status == "done" for run in runs)
    print(f"report over {len(runs)} jobs ({done} done) written to {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
