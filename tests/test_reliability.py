"""Reliability round three (issue 24), through the entry points as a user runs them: a refused
run leaves its directory as it was; an ordinary fault or a user's mistake is one sentence; a
stop by Ctrl-C checkpoints like SIGTERM; secrets never reach a run's files. Each test writes its
own files under ``tmp_path``."""

import errno
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, assert_user_error, environment, run_entry, start_entry

from tadfkd.base import files, schema
from tadfkd.base.errors import (
    Interrupted,
    NonFiniteLoss,
    RunDirectoryInUse,
    SignalReceived,
    UserError,
    exit_code,
    headline,
)
from tadfkd.run.rundir import RECORD_FOLDER, save_hydra_record

TINY = ["debug=tiny", "runtime.device=cpu", "runtime.threads=1", "logger=none"]


def test_one_table_gives_the_exit_code_and_line_of_every_way_a_job_ends():
    ends = {
        UserError("x"): (2, "error: x"),
        RunDirectoryInUse("x"): (2, "error: x"),
        NonFiniteLoss("x"): (4, "stopped: x"),
        Interrupted("x", "SIGTERM"): (3, "stopped: x"),
        Interrupted("x", "SIGINT"): (130, "stopped: x"),  # what a shell expects of Ctrl-C
        SignalReceived("SIGUSR1"): (3, None),
        SignalReceived("SIGINT"): (130, None),
        ValueError("a bug"): (1, None),  # its traceback shows
    }
    for error, (code, line) in ends.items():
        assert (exit_code(error), headline(error)) == (code, line), error


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside: its pid line is the last locker's)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run; tests copy it before touching it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_entry(*TINY, f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def copied_run(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


# -- item 2: a refused run changes nothing in an existing run directory -------------------------
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["seed=3", "optimizer.student.lr=0.5"], "other settings"),
        (["trainer.epochs=-1"], "trainer.epochs=-1 must be"),
    ],
    ids=["other settings", "invalid value"],
)
def test_a_refused_run_leaves_the_run_directory_as_it_was(copied_run, overrides, fragment):
    before = snapshot(copied_run)
    assert (copied_run / RECORD_FOLDER / "config.yaml").exists()
    result = run_entry(*TINY, *overrides, f"hydra.run.dir={copied_run}", timeout=300)
    assert_user_error(result, fragment)
    assert snapshot(copied_run) == before


def test_an_accepted_run_writes_hydras_record_itself(copied_run):
    (copied_run / RECORD_FOLDER / "overrides.yaml").unlink()
    result = run_entry(*TINY, f"hydra.run.dir={copied_run}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished" in result.stdout
    overrides = (copied_run / RECORD_FOLDER / "overrides.yaml").read_text()
    assert "debug=tiny" in overrides


def test_a_full_disk_while_hydras_record_is_written_is_one_sentence(tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_bytes", full)
    with pytest.raises(UserError, match=r"could not write .*config.yaml \(No space left"):
        save_hydra_record(tmp_path, {"config.yaml": "seed: 0\n", "hydra.yaml": "x: 1\n"})
    assert not any(path.is_file() for path in tmp_path.rglob("*"))  # no 0-byte file left


# -- item 5: an ordinary fault or a user's mistake is one sentence -----------------------------
@pytest.mark.parametrize("entry", ["run.py", "-m tadfkd.train_teacher"])
def test_an_unset_environment_variable_in_an_override_is_one_sentence(tmp_path, entry):
    result = run_entry(
        "runtime.threads=1",
        "seed=${oc.env:TADFKD_TEST_UNSET_VARIABLE}",
        f"hydra.run.dir={tmp_path / 'run'}",
        entry=entry,
        timeout=300,
    )
    assert_user_error(result, "seed cannot be resolved", "TADFKD_TEST_UNSET_VARIABLE")


@pytest.mark.parametrize(
    "damage",
    ['{"student_final_acc": 0.9', '{"student_final_acc": "abc"}', ""],
    ids=["cut short", "wrongly typed", "empty"],
)
def test_a_damaged_results_file_of_a_finished_run_is_rebuilt_from_its_checkpoint(
    copied_run, damage
):
    path = copied_run / schema.RESULTS_FILE
    original = json.loads(path.read_text())
    path.write_text(damage)
    result = run_entry(*TINY, f"hydra.run.dir={copied_run}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rebuilding it from the final checkpoint" in result.stdout + result.stderr
    rebuilt = json.loads(path.read_text())
    for key in (*schema.ACCURACY_FIELDS, schema.EPOCH_ACCS, "seed", "teacher"):
        assert rebuilt[key] == original[key], key


def test_ctrl_c_during_training_checkpoints_and_says_stopped(tmp_path):
    run_dir = tmp_path / "run"
    longer = [*TINY, "trainer.epochs=8", "trainer.iters_per_epoch=6"]
    process = start_entry(*longer, f"hydra.run.dir={run_dir}")
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch 1/"):
            process.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "stopped: SIGINT received; checkpoint saved after" in output
    assert (run_dir / "checkpoint.pt").exists()
    again = run_entry(*longer, f"hydra.run.dir={run_dir}", timeout=300)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]


# -- item 6: a teacher of another dataset is refused unless the user says so -------------------
def test_a_teacher_of_another_dataset_runs_only_when_the_user_says_so(tmp_path):
    teacher = tmp_path / "fmnist_like.pt"
    shutil.copy(ROOT / "Pretrained_Teachers" / "digits" / "digits_cnn.pt", teacher)
    teacher.with_suffix(".json").write_text(json.dumps({"dataset": "fashion_mnist"}))
    overrides = [*TINY, f"teacher.checkpoint={teacher}"]
    refused = run_entry(*overrides, f"hydra.run.dir={tmp_path / 'a'}", timeout=300)
    assert_user_error(refused, "was trained on fashion_mnist", "not on dataset digits")
    allowed = run_entry(
        *overrides,
        "runtime.check_teacher_dataset=false",
        f"hydra.run.dir={tmp_path / 'b'}",
        timeout=300,
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]


# -- item 8: secrets never reach a run's files; stale temporaries are removed -------------------
def test_an_interpolated_secret_never_reaches_the_run_files_or_wandb(tmp_path):
    run_dir = tmp_path / "run"
    secret, listed = "secret-marker-0123456789", "listed-marker-0123456789"
    env = environment(WANDB_API_KEY=secret, MY_TOKEN=listed)
    result = run_entry(
        *TINY[:3],
        "logger=wandb",
        "logger.mode=offline",
        "logger.group=${oc.env:WANDB_API_KEY}",
        "teacher.name=t-${oc.env:MY_TOKEN}",
        "runtime.secret_env=[MY_TOKEN]",
        f"hydra.run.dir={run_dir}",
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for marker in (secret, listed):
        leaks = subprocess.run(["grep", "-rl", marker, str(run_dir)], capture_output=True)
        assert leaks.stdout == b"", f"{marker} written to {leaks.stdout.decode()}"
        assert marker not in result.stdout + result.stderr
    assert json.loads((run_dir / schema.RESULTS_FILE).read_text())["teacher"] == "t-<redacted>"


def test_a_temporary_folder_left_by_a_killed_write_is_removed_at_the_next_start(copied_run):
    stale = copied_run / ".checkpoint.pt.k1ll3d_x"
    stale.mkdir()
    (stale / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    other = copied_run / ".notes.keepme12"  # not a temporary: another file inside
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    result = run_entry(*TINY, f"hydra.run.dir={copied_run}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists() and (other / "mine.txt").exists()
