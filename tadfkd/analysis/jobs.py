"""The jobs of a sweep, read from a sweep directory (each run directory's ``results.json`` /
``failed.json`` and ``.hydra/`` files) or from a W&B group (the public API), and the student's
supervised ceiling. A file that cannot be read makes its job ``unreadable``, never a crash; job
configs are read without resolving interpolations, so no environment variable reaches a report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.run.results import is_fraction, load_results, results_problem, run_status
from tadfkd.run.rundir import LOCK_FILE

REPOSITORY = Path(__file__).resolve().parents[2]
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
        return {key: float(last[key]) for key in schema.HEALTH if last.get(key) is not None}

    @property
    def epochs_time(self) -> float | None:
        """Seconds the job spent in its epochs (``time/epoch_s`` summed over its history, so
        over every launch of a resumed run), or None when its history has no epoch times."""
        history = self.results.get(schema.HISTORY) or []
        seconds = [row.get(schema.EPOCH_SECONDS) for row in history]
        seconds = [value for value in seconds if isinstance(value, int | float)]
        return float(sum(seconds)) if seconds else None

    def accuracy(self, key: str) -> float | None:
        """One accuracy of ``results.json`` (a fraction), None when not measured."""
        value = self.results.get(key)
        return None if value is None else float(value)


def plain(value: Any) -> Any:
    """A config value as written, or None for an interpolation (never resolved here)."""
    return None if isinstance(value, str) and "${" in value else value


def label(config: dict[str, Any], *keys: str) -> str:
    """The config value at ``keys`` as text, "?" when it is absent or an interpolation."""
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    value = plain(node)
    return "?" if value is None else str(value)


# -- a sweep directory --------------------------------------------------------------------------
def _job_order(path: Path) -> list[Any]:
    """Natural order of run directory names (``2_...`` before ``10_...``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_yaml(path: Path) -> Any:
    """A YAML file as plain data (interpolations stay unresolved strings)."""
    return yaml.safe_load(path.read_text())


def read_run_directory(run_dir: Path) -> Run:
    """One run directory: its status, labels (from results.json or .hydra/config.yaml), error.
    A file that cannot be read makes the job ``unreadable`` (with the reason), not a crash."""
    run = Run(name=run_dir.name, status=run_status(run_dir))
    try:
        config_file = run_dir / ".hydra" / "config.yaml"
        if config_file.exists():
            run.config = _read_yaml(config_file) or {}
            run.method = label(run.config, "method", "name")
            run.teacher = label(run.config, "teacher", "name")
            run.student = label(run.config, "student", "arch")
            run.dataset = label(run.config, "dataset", "name")
            seed = plain(run.config.get("seed"))
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


# -- a W&B group --------------------------------------------------------------------------------
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
        method=str(summary.get("method", label(config, "method", "name"))),
        teacher=str(summary.get("teacher", label(config, "teacher", "name"))),
        student=str(summary.get("student", label(config, "student", "arch"))),
        dataset=str(summary.get("dataset", label(config, "dataset", "name"))),
        seed=config.get("seed"),
        error=None if status != "failed" else f"W&B state {wandb_run.state}",
        config=config,
    )
    if done:
        rows = list(wandb_run.scan_history(keys=[schema.STUDENT_ACC, *schema.HEALTH]))
        run.results = {
            **summary,
            schema.EPOCH_ACCS: [row.get(schema.STUDENT_ACC) for row in rows],
            schema.HISTORY: rows,
        }
        problem = results_problem(run.results)
        if problem is not None:
            run.status, run.results, run.error = "unreadable", {}, f"unreadable ({problem})"
    return run


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


# -- the supervised ceiling ---------------------------------------------------------------------
def check_ceiling_file(path: Path | None) -> None:
    """A ``--ceiling`` the user named must be a file: never silently ignored."""
    if path is not None and not path.is_file():
        raise UserError(
            f"--ceiling {path} is not a file; pass the .json metadata of the student trained on "
            "real data, or leave --ceiling out."
        )


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
