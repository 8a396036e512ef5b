"""Report over a sweep: ``python -m tadfkd.report <sweep dir | entity/project/group> [--out DIR]``.

Reads every job of a sweep (the ``results.json`` / ``failed.json`` and ``.hydra/`` files of each
run directory under a sweep directory, or the runs of a W&B group through the public API) and
writes ``report.md`` (percent), ``report.csv`` (per method and accuracy), ``pairs.csv`` (paired
differences between methods), ``runs.csv`` (per job; fractions in the CSVs) and two plots:
``curves.png`` (student test accuracy per epoch, one panel per teacher, with chance level,
teacher accuracy and the student's supervised ceiling) and ``health.png`` (final data-free
health signals against final accuracy, coloured by teacher). Partial sweeps are fine: jobs still
running, failed jobs and unreadable run directories are counted and listed.

A run *collapses* when its student accuracy is below ``--collapse-below`` (default 0.5) times its
teacher's test accuracy: the student kept less than half of what the teacher knows. Job configs
are read without resolving interpolations, so no environment variable ever reaches a report.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.base.files import reason
from tadfkd.run.results import is_fraction, load_results, results_problem, run_status
from tadfkd.run.rundir import LOCK_FILE

REPOSITORY = Path(__file__).resolve().parents[2]
ACCURACIES = schema.ACCURACY_FIELDS
SHORT = {schema.FINAL_ACC: "final", schema.LAST_K_ACC: "last10", schema.BEST_ACC: "best"}
# final-epoch data-free health signals (fractions) plotted against final accuracy
HEALTH = {
    schema.TEACHER_CLASS_ENTROPY: "teacher class entropy (fraction of log K)",
    schema.TEACHER_CONFIDENCE: "teacher confidence (mean max probability)",
    schema.AGREEMENT: "teacher-student agreement (fraction)",
    schema.SELECTION_RATE: "selection rate (fraction kept)",
}
DEFAULT_COLLAPSE_BELOW = 0.5
W_AND_B_PATH = re.compile(r"^[\w.-]+/[\w.-]+/[\w.=:+-]+$")


@dataclass
class Run:
    """One job of a sweep; ``results`` holds its results.json (empty unless done)."""

    name: str
    status: str  # done, failed, running or unreadable
    method: str = "?"
    teacher: str = "?"
    student: str = "?"
    dataset: str = "?"
    seed: int | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def final_health(self) -> dict[str, float]:
        """Health signals of the last recorded epoch (empty when there is no history)."""
        history = self.results.get(schema.HISTORY) or []
        last = history[-1] if history else {}
        return {key: float(last[key]) for key in HEALTH if last.get(key) is not None}

    def accuracy(self, key: str) -> float | None:
        """One accuracy of ``results.json`` (a fraction), None when not measured."""
        value = self.results.get(key)
        return None if value is None else float(value)


# -- reading ------------------------------------------------------------------------------------
def _job_order(path: Path) -> list[Any]:
    """Natural order of run directory names (``2_...`` before ``10_...``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _plain(value: Any) -> Any:
    """A config value as written, or None for an interpolation (never resolved here)."""
    return None if isinstance(value, str) and "${" in value else value


def _read_yaml(path: Path) -> Any:
    """A YAML file as plain data (interpolations stay unresolved strings)."""
    return yaml.safe_load(path.read_text())


def _label(config: dict[str, Any], *keys: str) -> str:
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    value = _plain(node)
    return "?" if value is None else str(value)


def read_run_directory(run_dir: Path) -> Run:
    """One run directory: its status, labels (from results.json or .hydra/config.yaml), error.
    A file that cannot be read makes the job ``unreadable`` (with the reason), not a crash."""
    run = Run(name=run_dir.name, status=run_status(run_dir))
    try:
        config_file = run_dir / ".hydra" / "config.yaml"
        if config_file.exists():
            run.config = _read_yaml(config_file) or {}
            run.method = _label(run.config, "method", "name")
            run.teacher = _label(run.config, "teacher", "name")
            run.student = _label(run.config, "student", "arch")
            run.dataset = _label(run.config, "dataset", "name")
            seed = _plain(run.config.get("seed"))
            run.seed = seed if isinstance(seed, int) else None
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if overrides_file.exists():
            run.overrides = [str(item) for item in _read_yaml(overrides_file) or []]
        if run.status == "done":
            run.results = load_results(run_dir)  # every field checked: ValueError otherwise
            run.method, run.teacher = run.results["method"], run.results["teacher"]
            run.student, run.dataset = run.results["student"], run.results["dataset"]
            run.seed = run.results["seed"]
        elif run.status == "failed":
            failure = json.loads((run_dir / schema.FAILED_FILE).read_text())
            run.error = f"{failure.get('error_type', 'Error')}: {failure.get('error', '')}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as error:
        run.status, run.results = "unreadable", {}
        run.error = f"unreadable ({type(error).__name__}: {error})"
    return run


def read_sweep_directory(sweep_dir: Path) -> list[Run]:
    """Every job under a sweep directory: each folder holding ``.hydra/``, a results file or a
    run's lock file (a job that a live run holds writes its ``.hydra/`` only once accepted)."""
    markers = [*sweep_dir.rglob(".hydra"), *sweep_dir.rglob(schema.RESULTS_FILE)]
    markers += list(sweep_dir.rglob(LOCK_FILE))
    markers += list(sweep_dir.rglob(schema.FAILED_FILE))
    run_dirs = {marker.parent for marker in markers if ".submitit" not in marker.parts}
    run_dirs.discard(sweep_dir)  # Hydra's multirun.yaml record is not a job
    if not run_dirs:
        raise UserError(
            f"{sweep_dir} holds no run directories (none with .hydra/ or {schema.RESULTS_FILE}); "
            "pass the sweep directory that `python run.py -m` printed."
        )
    return [read_run_directory(run_dir) for run_dir in sorted(run_dirs, key=_job_order)]


def read_wandb_group(path: str) -> list[Run]:
    """Every run of the W&B group ``entity/project/group``, through the public API (needs the
    network and WANDB_API_KEY)."""
    entity, project, group = path.split("/")
    try:
        import wandb

        api = wandb.Api(timeout=60)
        wandb_runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
    except Exception as error:  # noqa: BLE001 - any API failure becomes one sentence
        raise UserError(
            f"could not read W&B group {path!r} ({type(error).__name__}: {error}); check the "
            "network and WANDB_API_KEY, or pass a sweep directory instead."
        ) from error
    if not wandb_runs:
        raise UserError(f"W&B project {entity}/{project} has no runs in group {group!r}.")
    return [_wandb_run(wandb_run) for wandb_run in wandb_runs]


def _wandb_run(wandb_run: Any) -> Run:
    summary, config = dict(wandb_run.summary), dict(wandb_run.config)
    done = wandb_run.state == "finished" and schema.FINAL_ACC in summary
    status = "done" if done else ("running" if wandb_run.state == "running" else "failed")
    run = Run(
        name=wandb_run.name,
        status=status,
        method=str(summary.get("method", _label(config, "method", "name"))),
        teacher=str(summary.get("teacher", _label(config, "teacher", "name"))),
        student=str(summary.get("student", _label(config, "student", "arch"))),
        dataset=str(summary.get("dataset", _label(config, "dataset", "name"))),
        seed=config.get("seed"),
        error=None if status != "failed" else f"W&B state {wandb_run.state}",
        config=config,
    )
    if done:
        rows = list(wandb_run.scan_history(keys=[schema.STUDENT_ACC, *HEALTH]))
        run.results = {
            **summary,
            schema.EPOCH_ACCS: [row.get(schema.STUDENT_ACC) for row in rows],
            schema.HISTORY: rows,
        }
        problem = results_problem(run.results)
        if problem is not None:
            run.status, run.results, run.error = "unreadable", {}, f"unreadable ({problem})"
    return run


# -- numbers ------------------------------------------------------------------------------------
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
        for key in ACCURACIES:
            done = measured(jobs, key)
            values = [run.accuracy(key) for run in done]
            mean, std, half = interval(values)
            by_teacher: dict[str, list[float]] = {}
            for run in done:
                by_teacher.setdefault(run.teacher, []).append(run.accuracy(key))
            worst_teacher = min(by_teacher, key=lambda t: np.mean(by_teacher[t]), default=None)
            rows.append(
                {
                    "method": method,
                    "accuracy": SHORT[key],
                    "jobs": len(jobs),
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


def ceiling_of(dataset: str, student: str, path: Path | None = None) -> dict[str, Any] | None:
    """The student's supervised ceiling: the metadata of the student architecture trained on
    the real data (``--ceiling FILE.json``, else ``Pretrained_Teachers/<dataset>/ceiling_<student>
    .json`` of this repository), or None when there is none."""
    path = path or REPOSITORY / "Pretrained_Teachers" / dataset / f"ceiling_{student}.json"
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
        test_acc, arch = metadata["test_acc"], metadata["arch"]
        if not isinstance(arch, str) or not is_fraction(test_acc):
            raise ValueError("test_acc must be a fraction in [0, 1] and arch a name")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"ceiling file {path} is not teacher-job metadata ({error}).") from None
    return {"test_acc": float(test_acc), "arch": arch, "path": path}


def check_ceiling_file(path: Path | None) -> None:
    """A ``--ceiling`` the user named must be a file: never silently ignored."""
    if path is not None and not path.is_file():
        raise UserError(
            f"--ceiling {path} is not a file; pass the .json metadata of the student trained on "
            "real data, or leave --ceiling out."
        )


def describe(runs: Sequence[Run]) -> dict[str, Any]:
    """What was run: datasets, students, schedules, the overrides every job shares and those
    that vary, the commits, epochs per job, jobs per (teacher, method) cell."""
    done = [run for run in runs if run.status == "done"]

    def values(*keys: str) -> list[str]:
        return sorted({cell(_label(run.config, *keys)) for run in runs if run.config} - {"?"})

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
        "epochs_time_s": [epochs_time(run) for run in done],
    }


# -- writing ------------------------------------------------------------------------------------
# runs.csv: a job's time as the sum of its epochs' ``time/epoch_s`` (every launch of a resumed
# run; ``wall_time_s`` counts its last launch only)
EPOCHS_TIME = "epochs_time_s"


def epochs_time(run: Run) -> float | None:
    """Seconds a job spent in its epochs (``time/epoch_s`` summed over its history, so over every
    launch of a resumed run), or None when its history has no epoch times."""
    seconds = [row.get(schema.EPOCH_SECONDS) for row in run.results.get(schema.HISTORY) or []]
    seconds = [value for value in seconds if isinstance(value, int | float)]
    return float(sum(seconds)) if seconds else None


def commits_text(commits: list[str], missing: int) -> str:
    """The code commits of the finished jobs, and how many jobs recorded none (older code)."""
    text = ", ".join(cell(commit[:12]) for commit in commits) or "not recorded"
    if commits and missing:
        text += f" (not recorded by {missing} job{'s' if missing > 1 else ''}: older code)"
    return text


def cell(value: Any) -> str:
    """``value`` as text that stays in one Markdown table cell or code span: whitespace (line
    breaks included) as single spaces, ``|`` escaped, backticks as quotes."""
    return " ".join(str(value).split()).replace("|", "\\|").replace("`", "'")


def percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def write_csvs(
    runs: Sequence[Run],
    summary: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    out: Path,
) -> None:
    for name, rows in (("report.csv", summary), ("pairs.csv", pairs)):
        with (out / name).open("w", newline="") as handle:
            fields = list(rows[0]) if rows else ["method"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    fields = ["job", "status", "dataset", "teacher", "student", "method", "seed", "teacher_acc"]
    fields += [*ACCURACIES, *HEALTH, EPOCHS_TIME, schema.WALL_TIME, "error"]
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow(
                {
                    "job": run.name,
                    "status": run.status,
                    "dataset": run.dataset,
                    "teacher": run.teacher,
                    "student": run.student,
                    "method": run.method,
                    "seed": run.seed,
                    "error": run.error,
                    **{key: run.results.get(key) for key in (*ACCURACIES, "teacher_acc")},
                    EPOCHS_TIME: epochs_time(run),
                    schema.WALL_TIME: run.results.get(schema.WALL_TIME),
                    **run.final_health,
                }
            )


def last_k_words(runs: Sequence[Run]) -> str:
    """What ``student_last10_acc`` is in these runs, e.g. "mean of the last 2 epochs"."""
    epochs = {len(run.results.get(schema.EPOCH_ACCS) or []) for run in runs if run.results}
    words = sorted({schema.last_k_label(e) for e in epochs if e})
    return " / ".join(words) if words else schema.last_k_label(schema.LAST_K)


def header_lines(
    source: str, runs: Sequence[Run], ceiling: dict[str, Any] | None, collapse_below: float
) -> list[str]:
    """Title, what was run, the job counts and the definitions of every figure."""
    counts = {s: sum(run.status == s for run in runs) for s in ("done", "failed", "running")}
    unreadable = sum(run.status == "unreadable" for run in runs)
    about = describe(runs)
    times = [t for t in about["epochs_time_s"] if t is not None]
    last_launch = [t for t in about["wall_time_s"] if t is not None]
    lines = [
        f"# Sweep report: {cell(Path(source).name or source)}",
        "",
        f"Source: `{cell(source)}`. {len(runs)} jobs: {counts['done']} done, {counts['failed']} "
        f"failed, {counts['running']} running or unfinished, {unreadable} unreadable.",
        "",
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
        + ".",
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
            f"data reaches {percent(ceiling['test_acc'])}% (`{cell(ceiling['path'].name)}`)."
        )
    if counts["failed"] or counts["running"] or unreadable:
        lines.append(
            "**Partial sweep**: the numbers below cover the finished jobs only; the others are "
            "listed at the end (jobs not started yet have no run directory and are not counted)."
        )
    lines += [
        "",
        "Accuracies are student test-set accuracies in percent over every finished job of a "
        "method (all teachers and seeds). *final*: after the last epoch. *last10*: "
        f"{last_k_words(runs)}. *best*: the best epoch, chosen on the test set itself, so "
        "optimistic (for comparison with published numbers only). std: sample standard "
        "deviation over jobs (ddof 1); 95% CI: Student-t interval of the mean; n: jobs. worst: "
        "lowest job; worst teacher: the teacher with the lowest mean. collapse: share of jobs "
        f"whose student is below {100 * collapse_below:.0f}% of its teacher's test accuracy.",
    ]
    return lines


def markdown(
    source: str,
    runs: Sequence[Run],
    summary: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    ceiling: dict[str, Any] | None,
    collapse_below: float,
) -> str:
    lines = header_lines(source, runs, ceiling, collapse_below)
    lines += [
        "",
        "## Per method, across teachers and seeds",
        "",
        "| method | accuracy | n / jobs | mean ± std (%) | 95% CI (%) | worst (%) | "
        "worst teacher (mean %) | collapse (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        ci = f"{percent(row['ci95_low'])} - {percent(row['ci95_high'])}"
        lines.append(
            f"| {cell(row['method'])} | {row['accuracy']} | {row['n']} / {row['jobs']} | "
            f"{percent(row['mean'])} ± {percent(row['std'])} | {ci} | {percent(row['worst'])} | "
            f"{cell(row['worst_teacher'] or 'n/a')} ({percent(row['worst_teacher_mean'])}) | "
            f"{percent(row['collapse_rate'], 0)} |"
        )
    lines += teacher_lines(runs) + pair_lines(pairs) + plot_lines() + problem_lines(runs)
    return "\n".join(lines) + "\n"


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
            cells.append(f"{percent(mean)} ± {percent(std)} (n={n})" if n else "n/a")
        lines.append(
            f"| {cell(teacher)} | {percent(teacher_acc.get(teacher))} | " + " | ".join(cells) + " |"
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
        ci = f"{percent(row['ci95_low'])} - {percent(row['ci95_high'])}"
        lines.append(
            f"| {cell(row['first'])} - {cell(row['second'])} | {row['pairs']} | "
            f"{percent(row['mean_difference'])} | {ci} | {percent(row['first_better'], 0)}% |"
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
    figure, axes = plt.subplots(
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
            axis.set_title(f"{teacher} (teacher {percent(acc)}%)", fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def reference_lines(axis, run: Run, ceiling: dict[str, Any] | None) -> None:
    """Chance level, the teacher's accuracy and the supervised ceiling on a curves panel."""
    classes = _plain((run.config.get("dataset") or {}).get("num_classes"))
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
    figure, axes = plt.subplots(1, len(HEALTH), figsize=(4 * len(HEALTH), 3.6), sharey=True)
    for axis, (key, label) in zip(axes, HEALTH.items(), strict=True):
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
        figure.legend(handles=handles, fontsize=7, loc="center right")
        figure.tight_layout(rect=(0, 0, 0.85, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    runs: Sequence[Run],
    source: str,
    out: Path,
    collapse_below: float = DEFAULT_COLLAPSE_BELOW,
    ceiling_file: Path | None = None,
) -> list[dict[str, Any]]:
    """Write report.md, report.csv, pairs.csv, runs.csv, curves.png and health.png into
    ``out``; returns the per-method summary rows (fractions)."""
    if not 0 < collapse_below <= 1:
        raise UserError(f"--collapse-below={collapse_below} must be a fraction in (0, 1].")
    check_ceiling_file(ceiling_file)
    done = [run for run in runs if run.status == "done"]
    ceiling = None
    if done and len({(run.dataset, run.student) for run in done}) == 1:
        ceiling = ceiling_of(done[0].dataset, done[0].student, ceiling_file)
    summary = method_summary(runs, collapse_below)
    pairs = paired_differences(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csvs(runs, summary, pairs, out)
        text = markdown(source, runs, summary, pairs, ceiling, collapse_below)
        (out / "report.md").write_text(text)
        plot_curves(runs, out / "curves.png", ceiling)
        plot_health(runs, out / "health.png")
    except OSError as error:
        raise UserError(
            f"the report cannot be written into {out} ({reason(error)}); pass --out a folder "
            "you can write to."
        ) from None
    return summary


def read_source(source: str) -> tuple[list[Run], Path]:
    """The jobs of ``source`` (a sweep directory, or a W&B group as ``entity/project/group``)
    and the default output folder (the sweep directory, or ``reports/<group>``)."""
    path = Path(source)
    if path.is_dir():
        return read_sweep_directory(path), path
    if not W_AND_B_PATH.match(source):
        raise UserError(
            f"{source} is not a directory; pass a sweep directory, or a W&B group as "
            "entity/project/group."
        )
    group = source.rsplit("/", 1)[1]
    safe = re.sub(r"[^\w.=+-]", "_", group).lstrip(".") or "group"
    return read_wandb_group(source), Path("reports") / safe
