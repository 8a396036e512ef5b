"""One run per directory, through ``run.py``: of two runs started at once on one directory, one
finishes and the other ends in one sentence naming the directory and the live process, leaving
the first one's files whole; a sweep job refused the same way writes nothing into the live run's
directory; a lock left by a killed process never blocks the next run."""

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import assert_user_error, run_entry, start_entry

from tadfkd.base import schema
from tadfkd.run.checkpoint import LATEST, PREVIOUS, read_checkpoint
from tadfkd.run.rundir import LOCK_FILE

TINY = ["debug=tiny", "trainer.epochs=8", "runtime.device=cpu", "logger=none"]
# Eight epochs of six iterations: seconds of training, longer than one run's start takes.
LONGER = [*TINY, "trainer.iters_per_epoch=6"]


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def busy_message(output: str, run_dir: Path) -> str:
    """The last line, checked to be the one sentence that ``run_dir`` is in use."""
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {run_dir} is in use by another run"), last
    return last


def wait_for_line(process: subprocess.Popen, prefix: str) -> str:
    """Read the process's output up to the first line starting with ``prefix``."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"no line starting with {prefix!r}: {''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_directory(tmp_path):
    run_dir = tmp_path / "run"
    runs = {
        seed: start_entry(*LONGER, f"seed={seed}", f"hydra.run.dir={run_dir}") for seed in (0, 1)
    }
    outcomes = {seed: finish(process) for seed, process in runs.items()}
    codes = sorted(code for code, _ in outcomes.values())
    assert codes == [0, 2], {seed: output[-2000:] for seed, (_, output) in outcomes.items()}
    winner = next(seed for seed, (code, _) in outcomes.items() if code == 0)
    loser = 1 - winner
    message = busy_message(outcomes[loser][1], run_dir)
    assert f"(process {runs[winner].pid})" in message  # the live process, by its id
    assert "epoch 1/" not in outcomes[loser][1]
    # The winner's files are whole and all its own: results, both checkpoints, Hydra's record.
    assert json.loads((run_dir / schema.RESULTS_FILE).read_text())["seed"] == winner
    for name in (LATEST, PREVIOUS):
        assert read_checkpoint(run_dir / name)["identity"]["seed"] == winner
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"seed={winner}" in overrides
    hidden = {path.name for path in run_dir.iterdir() if path.name.startswith(".")}
    assert hidden == {".hydra", LOCK_FILE}, hidden  # no temporary file left by either run


@pytest.mark.slow
def test_resume_of_a_busy_directory_is_refused_and_a_killed_runs_lock_is_not(tmp_path):
    run_dir = tmp_path / "run"
    first = start_entry(*TINY, f"hydra.run.dir={run_dir}")
    try:
        wait_for_line(first, "epoch 2/")  # epoch 1 is checkpointed: resume=DIR is valid
        first.send_signal(signal.SIGSTOP)  # alive, holding the lock, however long the next takes
        # resume=DIR names the busy directory; Hydra's own directory for this run is another.
        second = run_entry(*TINY, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'other'}")
        assert_user_error(second, f"run directory {run_dir} is in use", f"(process {first.pid})")
        assert "epoch 1/" not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its file still names it
        first.stdout.close()
        first.wait(timeout=60)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(first.pid)
    third = run_entry(*TINY, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'other'}")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming from {run_dir}/" in third.stdout
    results = json.loads((run_dir / schema.RESULTS_FILE).read_text())
    assert len(results[schema.EPOCH_ACCS]) == 8
    assert (run_dir / LOCK_FILE).read_text().strip() != str(first.pid)  # the new run took it


@pytest.mark.slow
def test_a_sweep_job_whose_directory_another_run_holds_leaves_it_alone(tmp_path):
    # A second launch of a sweep while the first still runs a job (a sweep re-run to resume it):
    # the refused job says so in one sentence and writes no failed.json into the live run's
    # directory (it would mark a healthy run failed); the summary counts it as not finished,
    # and the launch exits 6: one of its jobs was left unrun.
    sweep_dir = tmp_path / "sweep"
    job_dir = sweep_dir / "job"
    job_dir.mkdir(parents=True)
    descriptor = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this test process is the live run
    os.write(descriptor, f"{os.getpid()}\n".encode())
    try:
        result = run_entry(
            "-m", *TINY, "seed=0", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=job"
        )
    finally:
        os.close(descriptor)
    assert result.returncode == 6, result.stderr[-3000:]
    assert "1 job was left unrun or unfinished" in result.stderr.strip().splitlines()[-1]
    assert f"error: run directory {job_dir} is in use by another run (process {os.getpid()})" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (job_dir / schema.FAILED_FILE).exists()
    assert not (job_dir / schema.RESULTS_FILE).exists()
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == f"sweep {sweep_dir}: 1 jobs, 0 done, 0 failed, 1 not finished ({job_dir})"
