"""W&B Sweeps (``sweeps/*.yaml``): every parameter value of every sweep composes with the real
config and passes its checks, the grids cover each dataset's teacher zoo, the search optimises a
data-free signal, and the exact command a W&B agent builds runs a job (one W&B run, grouped by
the sweep's id)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, compose_config, environment, options, read_wandb_run
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import (
    create_sweep_command,
    create_sweep_command_args,
    load_sweep_config,
)

from tadfkd.base import schema
from tadfkd.run.checks import validate

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
AGENT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
# The teacher options of each grid, and its DAFL weights
GRIDS = {
    "digits": ("digits_", "dafl"),
    "fashion_mnist": ("fmnist_", "dafl"),
    "cifar10": ("cifar10_", "dafl_cifar10"),
    "cifar100": ("cifar100_", "dafl_cifar100"),
    "tinyimagenet": ("tiny_", "dafl_cifar100"),
}


def load(path: Path) -> dict:
    """A sweep file as ``wandb sweep`` reads it; skipped while an option it names is still to
    come (``experiment=fashion_mnist``)."""
    sweep = load_sweep_config(str(path))
    assert sweep, f"wandb sweep cannot read {path}"
    experiment = sweep["parameters"].get("experiment", {}).get("value")
    if experiment and experiment not in options("experiment"):
        pytest.skip(f"conf/experiment/{experiment}.yaml is not there yet")
    return sweep


def candidates(parameter: dict) -> list:
    """The values a sweep may give one parameter: its value, its values, or the ends of its
    range."""
    if "value" in parameter:
        return [parameter["value"]]
    if "values" in parameter:
        return list(parameter["values"])
    return [parameter["min"], parameter["max"]]


def jobs(sweep: dict) -> list[dict]:
    """Jobs that give every parameter each of its candidates (the others at their first)."""
    first = {name: candidates(parameter)[0] for name, parameter in sweep["parameters"].items()}
    return [
        {**first, name: value}
        for name, parameter in sweep["parameters"].items()
        for value in candidates(parameter)
    ]


def agent_command(sweep: dict, job: dict) -> list[str]:
    """The command ``wandb agent`` runs for ``job`` (as ``wandb_agent.Agent._command_run``
    builds it, with wandb's own helpers)."""
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in job.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    command = []
    for chunk in create_sweep_command(list(sweep["command"])):
        command += macros[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    return command


def given(cfg, name: str):
    """What the composed ``cfg`` holds for a sweep parameter: a group's option, else the value
    as given (interpolations unresolved)."""
    if name in cfg.hydra.runtime.choices:
        return cfg.hydra.runtime.choices[name]
    parent, _, leaf = name.rpartition(".")
    return OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False)[leaf]


@pytest.mark.parametrize("path", SWEEPS, ids=[path.stem for path in SWEEPS])
def test_every_parameter_of_the_sweep_composes_and_passes_the_checks(path, monkeypatch):
    sweep = load(path)
    assert sweep["program"] == "run.py" and sweep["command"] == AGENT_COMMAND
    assert sweep["parameters"]["logger.mode"] == {"value": "online"}  # reports to its sweep
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweepid")  # what `wandb agent` sets for each job
    monkeypatch.setenv("WANDB_RUN_ID", "runid")
    for job in jobs(sweep):
        command = agent_command(sweep, job)
        assert command[:3] == ["/usr/bin/env", "python", "run.py"]
        cfg = compose_config(command[3:])
        validate(cfg)
        for name, value in job.items():
            assert given(cfg, name) == value, (name, given(cfg, name), value)
        assert cfg.hydra.run.dir == "multirun/wandb_sweep_sweepid/runid"  # a folder per job


@pytest.mark.parametrize("dataset", GRIDS)
def test_each_datasets_grid_is_its_whole_teacher_zoo_x_four_methods_x_two_seeds(dataset):
    sweep = load(ROOT / "sweeps" / f"{dataset}.yaml")
    prefix, dafl = GRIDS[dataset]
    parameters = sweep["parameters"]
    assert sweep["method"] == "grid"
    zoo = [option for option in options("teacher") if option.startswith(prefix)]
    assert sorted(parameters["teacher"]["values"]) == zoo
    assert parameters["method"]["values"] == ["tadfkd", "basic", "dfq", dafl]
    assert parameters["seed"]["values"] == [0, 1]
    dataset_name = compose_config(agent_command(sweep, jobs(sweep)[0])[3:]).dataset.name
    assert dataset_name == dataset


def test_the_search_example_maximises_a_data_free_signal_not_test_accuracy():
    text = (ROOT / "sweeps" / "digits_threshold.yaml").read_text()
    sweep = load_sweep_config(str(ROOT / "sweeps" / "digits_threshold.yaml"))
    assert sweep["method"] in ("bayes", "random")
    assert sweep["metric"] == {"name": schema.AGREEMENT, "goal": "maximize"}
    assert schema.AGREEMENT in schema.HEALTH
    assert set(sweep["parameters"]) - {"logger.mode", "hydra.run.dir"} == {
        "selection.threshold",
        "seed",
    }
    assert "test-set selection" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "digits_threshold"])
def test_the_command_an_agent_builds_runs_one_wandb_run_in_the_sweeps_group(name, tmp_path):
    sweep = load(ROOT / "sweeps" / f"{name}.yaml")
    job = jobs(sweep)[1]  # the first parameter at its second value: not the config's default
    command = agent_command(sweep, job)
    # shrunk to seconds, and offline: a test has no W&B server
    shrink = ["debug=tiny", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}"]
    env = environment(WANDB_SWEEP_ID="sweeptest", WANDB_RUN_ID="agentjob1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # an active venv
    result = subprocess.run(
        [*command, *shrink], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / schema.RESULTS_FILE).read_text())
    run, records = read_wandb_run(tmp_path)
    [started] = [record["run"] for record in records if record["type"] == "run"]
    assert started["run_group"] == "sweeptest" and run["state"] == "finished"
    assert run["run_id"] == results["wandb_run_id"] == "agentjob1"  # the agent's run
    job_overrides = [arg for arg in command[3:] if not arg.startswith("hydra.")]
    assert run["config"]["overrides"] == [*job_overrides, *shrink[:-1]]  # the agent's, in order
    assert results["seed"] == job["seed"] and f"-s{job['seed']}" in run["name"]
