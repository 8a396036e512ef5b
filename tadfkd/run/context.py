"""What Hydra knows about a job, read once by the entry point (``run.py``,
``tadfkd.train_teacher``) into a plain value that it passes down: nothing below the entry
points reads Hydra's runtime state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tadfkd.base.errors import UserError


@dataclass(frozen=True)
class JobContext:
    """One job as its entry point was asked for it.

    ``run_dir``: Hydra's output directory of the job; ``overrides``: the command line's
    overrides as typed (interpolations unresolved); ``sweep_dir``: the multirun's directory
    (None in a single run); ``side_by_side``: how many jobs of the sweep run at once on this
    machine; ``record``: what Hydra would write into ``run_dir/.hydra``, YAML texts by file
    name (``rundir.save_hydra_record`` writes it once the run is accepted).
    """

    run_dir: Path
    overrides: tuple[str, ...] = ()
    sweep_dir: Path | None = None
    side_by_side: int = 1
    record: dict[str, str] = field(default_factory=dict)

    @property
    def multirun(self) -> bool:
        return self.sweep_dir is not None


def hydra_context(task_config: DictConfig) -> JobContext:
    """The running Hydra job's context; ``task_config`` is the job's config as Hydra gave it
    (before the job changes it: the record holds it unresolved)."""
    hydra = HydraConfig.get()
    multirun = hydra.mode == RunMode.MULTIRUN
    # The overrides as typed: resolving them would run their resolvers (an unset
    # ``${oc.env:...}``) and write what they resolve to (a secret) wherever they go.
    overrides = tuple(str(item) for item in OmegaConf.to_container(hydra.overrides.task))
    return JobContext(
        run_dir=Path(hydra.runtime.output_dir),
        overrides=overrides,
        sweep_dir=Path(hydra.sweep.dir) if multirun else None,
        side_by_side=jobs_side_by_side(hydra, multirun),
        record={
            "config.yaml": OmegaConf.to_yaml(task_config),
            "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra.overrides.task),
        },
    )


def jobs_side_by_side(hydra: DictConfig, multirun: bool) -> int:
    """How many jobs of a sweep run at once on this machine: the batch size of Hydra's
    submitit-local launcher in a multirun, else 1 (a single run, the sequential basic launcher,
    or a cluster job with its own allocation)."""
    launcher = str(hydra.launcher.get("_target_", ""))
    if not multirun or not launcher.endswith("LocalLauncher"):
        return 1
    return max(1, int(hydra.sweeper.get("max_batch_size") or 1))


# Hydra's options that take the next argument as their value (a path or a name, never an override)
VALUED_OPTIONS = {
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "-p",
    "--package",
    "--experimental-rerun",
}


def refuse_keyless_overrides(arguments: list[str]) -> None:
    """Before Hydra reads the command line: an override that names no key (``=3``, ``+=3``),
    which Hydra's config loader meets with a traceback (or, for some, a message of its own),
    stops the entry point with one sentence and exit code 2. Options (``-m``, ``--cfg job``,
    the value after ``-cn`` and the like) and overrides Hydra's parser refuses are left to
    Hydra, which names them itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for previous, argument in zip(["", *arguments], arguments, strict=False):
        if previous in VALUED_OPTIONS or argument.startswith("-") or "=" not in argument:
            continue
        try:
            (override,) = parser.parse_overrides([argument])
        except HydraException:  # Hydra's own message says what is wrong
            continue
        if not override.key_or_group:
            raise UserError(
                f"the override {argument!r} names no key; write KEY=VALUE, e.g. seed=3."
            )
