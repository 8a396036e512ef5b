"""Reliability round three (issue 24), through the entry points as a user runs them: a refused
run leaves its directory as it was; an ordinary fault or a user's mistake is one sentence; a
stop by Ctrl-C checkpoints like SIGTERM; secrets never reach a run's files. Each test writes its
own files under ``tmp_path``."""

import errno
import shutil
from pathlib import Path

import pytest
from helpers import assert_user_error, run_entry

from tadfkd import files
from tadfkd.errors import UserError
from tadfkd.rundir import RECORD_FOLDER, save_hydra_record

TINY = ["debug=tiny", "runtime.device=cpu", "runtime.threads=1", "logger=none"]


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
