"""Experiment tracking: Weights & Biases (offline by default) or nothing.

A run must never hang on the network: online mode has a bounded init timeout and falls back to
offline mode with a warning that says why (``wandb sync <run dir>/wandb/offline-run-*`` uploads
it later), and a W&B error while logging warns once and is otherwise ignored: training goes on.

What a W&B run holds: the run's config without Hydra's instantiation keys (``dashboard_config``),
a name, a group and tags (``open_tracker``);
every per-epoch metric against ``epoch`` (``schema.EPOCH``), ``acc/student`` summarised as both
its last and its best value; the teacher's accuracy and the results in the summary; ``student.pt``
as a model artifact (``log_model``, with ``model_metadata``); and an exit code that is not 0 when
the job stopped early (``finishing``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tadfkd.base import schema
from tadfkd.base.errors import exit_code, signal_of
from tadfkd.run.checks import RUNTIME_NODES
from tadfkd.run.context import JobContext
from tadfkd.run.runtime import build

# Keys that tell Hydra how to build an object, not what the run is.
INSTANTIATION_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def dashboard_config(
    config: Mapping[str, Any],
    resolved: Mapping[str, Any],
    overrides: Sequence[str],
    run_dir: Path,
) -> dict[str, Any]:
    """The config a W&B run records: ``config`` (a resolved container) without
    ``INSTANTIATION_KEYS`` (a built node keeps its class's name as ``class``, so that runs of
    different loss terms or selection rules can be told apart), with the values the job
    resolved (e.g. ``{"runtime.device": "cuda"}`` for ``auto``) in place, plus the command
    line's ``overrides`` and the ``run_dir``."""

    def clean(node: Any) -> Any:
        if isinstance(node, Mapping):
            kept = {k: clean(v) for k, v in node.items() if k not in INSTANTIATION_KEYS}
            if isinstance(node.get("_target_"), str):
                kept["class"] = node["_target_"].rsplit(".", 1)[-1]
            return kept
        if isinstance(node, list | tuple):
            return [clean(item) for item in node]
        return node

    record = clean(config)
    for dotted, value in resolved.items():
        *parents, leaf = dotted.split(".")
        node = record
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return {**record, "overrides": list(overrides), "run_dir": str(run_dir)}


# Top-level keys a run name leaves out: already in it, or where and how the run goes.
UNNAMED_KEYS = (
    *RUNTIME_NODES,
    "method",
    "student",
    "teacher",
    "seed",
    "debug",
    "experiment",
    "sweep",
)


def run_name(cfg: DictConfig, overrides: Sequence[str]) -> str:
    """Readable run name, e.g. ``tadfkd-resnet18@cifar10_resnet34_9546-s0``, followed by the
    command line's ``overrides`` of what is computed (e.g. ``selection.threshold=0.4``), so
    that the jobs of one sweep have different names."""
    name = f"{cfg.method.name}-{cfg.student.arch}@{cfg.teacher.name}-s{cfg.seed}"
    others = [
        override
        for override in overrides
        if override.lstrip("+~").split("=")[0].split(".")[0].split("/")[0] not in UNNAMED_KEYS
    ]
    return " ".join([name, *others])


def run_group(cfg: DictConfig, context: JobContext) -> str | None:
    """W&B group: ``logger.group`` when set, else the sweep's name, which every job of one sweep
    shares (``python -m tadfkd.report entity/project/<group>`` reads them): the sweep
    directory's name in a multirun, the sweep's id in a W&B agent's job; else none."""
    group = OmegaConf.select(cfg, "logger.group")
    if group:
        return str(group)
    if context.sweep_dir is not None:
        return context.sweep_dir.name
    return os.environ.get("WANDB_SWEEP_ID") or None  # set by `wandb agent` for its jobs


def open_tracker(
    cfg: DictConfig,
    context: JobContext,
    run_dir: Path,
    resolved: Mapping[str, Any],
    run_id: str | None,
):
    """The run's tracker (``logger``) writing under ``run_dir``, its config holding the values
    ``auto`` resolved to on this machine (``resolved``, e.g. ``{"runtime.threads": 4}``: what
    a dashboard user filters on); ``run_id`` continues a resumed W&B run."""
    # The run's config and overrides are data for the tracker, given to its class by hand:
    # through instantiate they would be config again, their ${...} text resolved.
    tracker = build(cfg.logger, _partial_=True, _convert_="all")
    return tracker(
        directory=run_dir,
        run_config=dashboard_config(
            OmegaConf.to_container(cfg, resolve=True), resolved, context.overrides, run_dir
        ),
        name=run_name(cfg, context.overrides),
        group=run_group(cfg, context),
        tags=[cfg.dataset.name, cfg.teacher.name, cfg.student.arch, cfg.method.name],
        run_id=run_id,
    )


def model_metadata(
    results: Mapping[str, Any], identity: Mapping[str, Any], run_dir: Path
) -> dict[str, Any]:
    """What the W&B model artifact of ``student.pt`` says it is: the run's labels (the teacher's
    name, architecture and sha256 among them) and accuracies, W&B run, run directory and the
    settings that define the run (``checks.run_identity``)."""
    shown = (*schema.LABEL_FIELDS, "teacher_sha256", *schema.ACCURACY_FIELDS)
    return {
        **{key: results[key] for key in shown},
        schema.TEACHER_ACC_FIELD: results[schema.TEACHER_ACC_FIELD],
        "wandb_run_id": results["wandb_run_id"],
        "run_dir": str(run_dir),
        "identity": dict(identity),
    }


@contextlib.contextmanager
def finishing(tracker: Any) -> Iterator[None]:
    """Close ``tracker`` when the block ends: a job that stopped early with its exit code, so
    that the dashboard shows it as not finished (failed, or preempted by a stop signal)."""
    try:
        yield
    except BaseException as error:
        tracker.finish(exit_code=exit_code(error), preempted=signal_of(error) is not None)
        raise
    tracker.finish()


class NullTracker:
    """Logs nothing (``logger=none``)."""

    run_id: str | None = None

    def __init__(self, **_tracker_arguments: Any) -> None:
        """Accept (and ignore) the arguments every tracker is built with."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Drop ``metrics``."""

    def log_images(self, key: str, image: np.ndarray, step: int) -> None:
        """Drop the image."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Drop the summary."""

    def log_model(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """Drop the model file."""

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Nothing to close."""


def offline_reason(error: Exception, init_timeout: float) -> str:
    """Why an online W&B run could not start, in words (never the error's message, which may
    hold secrets)."""
    from wandb import errors

    if isinstance(error, errors.AuthenticationError):
        return "the W&B server refused the API key (check WANDB_API_KEY or run `wandb login`)"
    if isinstance(error, errors.CommError):
        return (
            f"the W&B server did not answer within logger.init_timeout={init_timeout:g} s (no "
            "network, a firewall or proxy, or a wrong WANDB_BASE_URL)"
        )
    if isinstance(error, errors.UsageError) and "API key" in str(error):
        return "no W&B API key is configured (run `wandb login` or set WANDB_API_KEY)"
    return f"W&B could not start an online run ({type(error).__name__})"


class WandbTracker:
    """One W&B run: the dashboard config, per-epoch metrics and image grids against ``epoch``,
    a summary, ``student.pt`` as a model artifact and an honest exit code.

    ``mode`` is ``offline`` (default), ``online`` or ``disabled``; the usual ``WANDB_*``
    environment variables apply. Files go under ``directory`` (the Hydra run directory).
    ``log_model`` false leaves the student's weights out of W&B.
    """

    def __init__(
        self,
        directory: str | Path,
        run_config: Mapping[str, Any],
        project: str = "tadfkd",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        init_timeout: float = 60.0,
        run_id: str | None = None,
        log_model: bool = True,
    ) -> None:
        import wandb

        self._wandb = wandb
        self._log_model = log_model
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=[str(tag)[:64] for tag in tags],
            config=dict(run_config),
            dir=str(directory),
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=init_timeout, console="off", silent=True),
        )
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as error:  # noqa: BLE001 - any W&B failure must not stop training
            if mode != "online":
                raise
            warnings.warn(
                f"W&B could not log online: {offline_reason(error, init_timeout)}; logging "
                "offline instead, upload later with: "
                f"wandb sync {directory / 'wandb'}/offline-run-*",
                stacklevel=2,
            )
            self.run = wandb.init(mode="offline", **kwargs)
        self.run_id = self.run.id
        self._failed = False
        self._guarded("define_metric", self._define_metrics)

    def _define_metrics(self) -> None:
        """``epoch`` is the x axis of every metric; ``acc/student`` is summarised as both its
        last and its best value (``acc/student.last``, ``acc/student.max``)."""
        self.run.define_metric(schema.EPOCH)
        self.run.define_metric("*", step_metric=schema.EPOCH)
        self.run.define_metric(schema.STUDENT_ACC, step_metric=schema.EPOCH, summary="last,max")

    def _guarded(self, action: str, call: Callable[[], None]) -> None:
        """Run one W&B call; its first failure warns (type only: messages may hold secrets)."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - W&B trouble must not stop training
            if not self._failed:
                warnings.warn(
                    f"W&B {action} failed ({type(error).__name__}); training goes on, later W&B "
                    "failures are not reported",
                    stacklevel=3,
                )
            self._failed = True

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` of epoch ``step`` (0: before training), ``epoch`` included."""
        row = {**metrics, schema.EPOCH: step}
        self._guarded("log", lambda: self.run.log(row, step=step))

    def log_images(self, key: str, image: np.ndarray, step: int) -> None:
        """Log an image (H, W, 3) or (H, W) of uint8 at epoch ``step``."""

        def write() -> None:
            self.run.log({key: self._wandb.Image(image), schema.EPOCH: step}, step=step)

        self._guarded("log", write)

    def summary(self, values: Mapping[str, Any]) -> None:
        def write() -> None:
            for key, value in values.items():
                self.run.summary[key] = value

        self._guarded("summary", write)

    def log_model(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """``path`` (``student.pt``) as the model artifact ``student-<run id>``, with
        ``metadata`` (the teacher's and the run's identity); nothing when ``log_model`` is off."""
        if not self._log_model:
            return

        def write() -> None:
            artifact = self._wandb.Artifact(
                f"student-{self.run_id}", type="model", metadata=dict(metadata)
            )
            # immutable: referenced in place, not copied into W&B's staging folder
            artifact.add_file(str(path), policy="immutable")
            self.run.log_artifact(artifact)

        self._guarded("log_model", write)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the run; a non-zero ``exit_code`` shows it as failed, ``preempted`` (a stop
        signal: the run resumes later) marks it so first."""

        def write() -> None:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)

        self._guarded("finish", write)
