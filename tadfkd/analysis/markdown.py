"""``report.md``: what was run, the definitions of every figure, the tables (per method, per
teacher, paired differences), the plots and the jobs that failed or are still running.
Accuracies are shown in percent; every name is escaped to stay in its table cell."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tadfkd.analysis.finding import Reference, finding_lines
from tadfkd.analysis.jobs import Run, label
from tadfkd.analysis.statistics import interval, methods_in_order, teacher_table
from tadfkd.base import schema
from tadfkd.run.results import percent

# a fraction as the figure of a table whose header says "(%)": no sign, "n/a" when not measured
figure = partial(percent, digits=1, sign="", missing="n/a")


def cell(value: Any) -> str:
    """``value`` as text that stays in one Markdown table cell or code span: whitespace (line
    breaks included) as single spaces, ``|`` escaped, backticks as quotes."""
    return " ".join(str(value).split()).replace("|", "\\|").replace("`", "'")


def commits_text(commits: list[str], missing: int) -> str:
    """The code commits of the finished jobs, and how many jobs recorded none (older code)."""
    text = ", ".join(cell(commit[:12]) for commit in commits) or "not recorded"
    if commits and missing:
        text += f" (not recorded by {missing} job{'s' if missing > 1 else ''}: older code)"
    return text


def last_k_words(runs: Sequence[Run]) -> str:
    """What ``student_last10_acc`` is in these runs, e.g. "mean of the last 2 epochs"."""
    epochs = {len(run.results.get(schema.EPOCH_ACCS) or []) for run in runs if run.results}
    words = sorted({schema.last_k_label(e) for e in epochs if e})
    return " / ".join(words) if words else schema.last_k_label(schema.LAST_K)


def describe(runs: Sequence[Run]) -> dict[str, Any]:
    """What was run: datasets, students, schedules, the overrides every job shares and those
    that vary, the commits, epochs per job, jobs per (teacher, method) cell."""
    done = [run for run in runs if run.status == "done"]

    def values(*keys: str) -> list[str]:
        return sorted({cell(label(run.config, *keys)) for run in runs if run.config} - {"?"})

    overrides = [set(run.overrides) for run in runs if run.overrides]
    shared = sorted(set.intersection(*overrides)) if overrides else []
    varying = sorted(
        {item.split("=", 1)[0] for o in overrides for item in o}
        - {item.split("=", 1)[0] for item in shared}
    )
    cells: dict[tuple[str, str], int] = {}
    for run in runs:
        cells[run.teacher, run.method] = cells.get((run.teacher, run.method), 0) + 1
    return {
        "datasets": sorted({run.dataset for run in runs} - {"?"}),
        "students": sorted({run.student for run in runs} - {"?"}),
        "epochs": sorted({len(run.results.get(schema.EPOCH_ACCS) or []) for run in done}),
        "iters_per_epoch": values("trainer", "iters_per_epoch"),
        "student_steps": values("trainer", "student_steps"),
        "batch_size": values("trainer", "batch_size"),
        "shared_overrides": shared,
        "varying": varying,
        "commits": sorted({str(run.results.get("commit")) for run in done} - {"None"}),
        "commits_missing": sum(run.results.get("commit") is None for run in done),
        "jobs_per_cell": sorted(set(cells.values())),
        "wall_time_s": [run.results.get(schema.WALL_TIME) for run in done],
        "epochs_time_s": [run.epochs_time for run in done],
    }


def what_was_run(about: dict[str, Any]) -> str:
    """The sentence on the datasets, students, schedule, commits and times of ``describe``."""
    times = [t for t in about["epochs_time_s"] if t is not None]
    last_launch = [t for t in about["wall_time_s"] if t is not None]
    return (
        "What was run: dataset "
        + (", ".join(map(cell, about["datasets"])) or "?")
        + "; student "
        + (", ".join(map(cell, about["students"])) or "?")
        + f"; {', '.join(map(str, about['epochs'])) or '?'} epochs of "
        + f"{', '.join(about['iters_per_epoch']) or '?'} iterations x "
        + f"{', '.join(about['student_steps']) or '?'} student steps + 1 generator step, batch "
        + f"{', '.join(about['batch_size']) or '?'}; jobs per (teacher, method) cell: "
        + ", ".join(map(str, about["jobs_per_cell"]))
        + f"; commit {commits_text(about['commits'], about['commits_missing'])}"
        + (
            f"; time per job {min(times):.0f}-{max(times):.0f} s (the sum of its epochs' times, "
            "resumed runs included)"
            if times
            else ""
        )
        + (
            f"; wall time of each job's last launch {min(last_launch):.0f}-{max(last_launch):.0f} s"
            if last_launch
            else ""
        )
        + "."
    )


def header_lines(
    source: str, runs: Sequence[Run], ceiling: dict[str, Any] | None, collapse_below: float
) -> list[str]:
    """Title, what was run, the job counts and the definitions of every figure."""
    counts = {s: sum(run.status == s for run in runs) for s in ("done", "failed", "running")}
    unreadable = sum(run.status == "unreadable" for run in runs)
    about = describe(runs)
    lines = [
        f"# Sweep report: {cell(Path(source).name or source)}",
        "",
        f"Source: `{cell(source)}`. {len(runs)} jobs: {counts['done']} done, {counts['failed']} "
        f"failed, {counts['running']} running or unfinished, {unreadable} unreadable.",
        "",
        what_was_run(about),
    ]
    if about["shared_overrides"] or about["varying"]:
        lines.append(
            "Overrides shared by every job: `"
            + " ".join(map(cell, about["shared_overrides"]))
            + "`; varied across jobs: "
            + (", ".join(f"`{cell(key)}`" for key in about["varying"]) or "none")
            + "."
        )
    if ceiling:
        lines.append(
            f"Supervised ceiling: the student architecture ({ceiling['arch']}) trained on the real "
            f"data reaches {percent(ceiling['test_acc'], 1)} (`{cell(ceiling['path'].name)}`)."
        )
    if counts["failed"] or counts["running"] or unreadable:
        lines.append(
            "**Partial sweep**: the numbers below cover the finished jobs only; the others are "
            "listed at the end (jobs not started yet have no run directory and are not counted)."
        )
    return [*lines, "", definitions(runs, collapse_below)]


def definitions(runs: Sequence[Run], collapse_below: float) -> str:
    """What every figure of the tables is."""
    return (
        "Accuracies are student test-set accuracies in percent over every finished job of a "
        "method (all teachers and seeds). *final*: after the last epoch. *last10*: "
        f"{last_k_words(runs)}. *best*: the best epoch, chosen on the test set itself, so "
        "optimistic (for comparison with published numbers only). std: sample standard "
        "deviation over jobs (ddof 1); 95% CI: Student-t interval of the mean; n: jobs. worst: "
        "lowest job; worst teacher: the teacher with the lowest mean. collapse: share of jobs "
        f"whose student is below {100 * collapse_below:.0f}% of its teacher's test accuracy."
    )


def report_markdown(
    source: str,
    runs: Sequence[Run],
    summary: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    ceiling: dict[str, Any] | None,
    collapse_below: float,
    launches: tuple[float, int, int, list[str]] | None = None,
    references: Sequence[Reference] = (),
) -> str:
    """The text of ``report.md``; ``launches``: the sweep's wall time over its launches
    (``launches.sweep_wall_time``), stated when known; ``references``: published figures the
    finding compares the best method with."""
    lines = header_lines(source, runs, ceiling, collapse_below)
    if launches is not None:
        lines.insert(5, launches_sentence(*launches))
    lines += finding_lines(runs, summary, pairs, ceiling, references)
    lines += method_lines(summary) + teacher_lines(runs) + pair_lines(pairs)
    lines += plot_lines() + problem_lines(runs)
    return "\n".join(lines) + "\n"


def launches_sentence(seconds: float, count: int, stopped: int, cpus: list[str]) -> str:
    """The sweep's wall time, summed over its launches, and the CPUs it ran on."""
    hours, minutes = divmod(round(seconds / 60), 60)
    stopped_words = (
        f" ({stopped} of them stopped before the end, counted to the last file they wrote)"
        if stopped
        else ""
    )
    return (
        f"Sweep wall time: {hours} h {minutes:02d} min ({seconds:.0f} s), summed over "
        f"{count} launch{'es' if count != 1 else ''}{stopped_words}"
        + (f"; CPU: {', '.join(map(cell, cpus))}" if cpus else "")
        + "."
    )


def method_lines(summary: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Per method, across teachers and seeds",
        "",
        "| method | accuracy | n / jobs | mean ± std (%) | 95% CI (%) | worst (%) | "
        "worst teacher (mean %) | collapse (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        ci = f"{figure(row['ci95_low'])} - {figure(row['ci95_high'])}"
        lines.append(
            f"| {cell(row['method'])} | {row['accuracy']} | {row['n']} / {row['jobs']} | "
            f"{figure(row['mean'])} ± {figure(row['std'])} | {ci} | {figure(row['worst'])} | "
            f"{cell(row['worst_teacher'] or 'n/a')} ({figure(row['worst_teacher_mean'])}) | "
            f"{figure(row['collapse_rate'], digits=0)} |"
        )
    return lines


def teacher_lines(runs: Sequence[Run]) -> list[str]:
    table, methods = teacher_table(runs), methods_in_order(runs)
    teacher_acc = {
        run.teacher: run.accuracy(schema.TEACHER_ACC_FIELD) for run in runs if run.status == "done"
    }
    lines = [
        "",
        "## Final accuracy per teacher (mean ± sample std over seeds, %)",
        "",
        "| teacher | teacher acc (%) | " + " | ".join(map(cell, methods)) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for teacher in sorted(table):
        cells = []
        for method in methods:
            mean, std, _ = interval(table[teacher].get(method, []))
            n = len(table[teacher].get(method, []))
            cells.append(f"{figure(mean)} ± {figure(std)} (n={n})" if n else "n/a")
        lines.append(
            f"| {cell(teacher)} | {figure(teacher_acc.get(teacher))} | " + " | ".join(cells) + " |"
        )
    return lines


def pair_lines(pairs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Paired differences (final accuracy, same teacher and seed)",
        "",
        "| A - B | pairs | mean difference (points) | 95% CI (points) | A better |",
        "|---|---|---|---|---|",
    ]
    for row in pairs:
        ci = f"{figure(row['ci95_low'])} - {figure(row['ci95_high'])}"
        lines.append(
            f"| {cell(row['first'])} - {cell(row['second'])} | {row['pairs']} | "
            f"{figure(row['mean_difference'])} | {ci} | {figure(row['first_better'], digits=0)}% |"
        )
    return lines


def plot_lines() -> list[str]:
    return [
        "",
        "## Plots",
        "",
        "Student test accuracy per epoch, one panel per teacher (thin: seeds; thick: mean; "
        "dotted: chance level, dashed: teacher accuracy, dash-dotted: supervised ceiling):",
        "",
        "![accuracy curves](curves.png)",
        "",
        "Final-epoch data-free health signals (computed on generated samples only) against "
        "final accuracy, coloured by teacher, marker by method:",
        "",
        "![health signals](health.png)",
    ]


def problem_lines(runs: Sequence[Run]) -> list[str]:
    lines = []
    failed = [run for run in runs if run.status in ("failed", "unreadable")]
    running = [run for run in runs if run.status == "running"]
    if failed:
        lines += [
            "",
            "## Failed or unreadable jobs",
            "",
            "| job | method | teacher | seed | error |",
        ]
        lines.append("|---|---|---|---|---|")
        for run in failed:
            error = cell(run.error or "")[:200]
            lines.append(
                f"| {cell(run.name)} | {cell(run.method)} | {cell(run.teacher)} | {run.seed} | "
                f"{error} |"
            )
    if running:
        lines += ["", "## Running or unfinished jobs", ""]
        lines += [
            f"- {cell(run.name)} ({cell(run.method)}, {cell(run.teacher)}, seed {run.seed})"
            for run in running
        ]
    return lines
