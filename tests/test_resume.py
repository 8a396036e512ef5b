"""Full-state checkpoints and resumption: a killed, preempted or interrupted run continues to
exactly the result of an uninterrupted one; damaged checkpoints are never loaded; a non-finite
loss stops (or skips) at the step where it appears."""

import errno
import json
import os
import queue
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, environment, start_entry, tiny_distiller
from omegaconf import OmegaConf

from tadfkd import schema
from tadfkd.checkpoint import (
    LATEST,
    PREVIOUS,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tadfkd.config import check_same_run, run_identity
from tadfkd.errors import NonFiniteLoss, UserError
from tadfkd.job import distil
from tadfkd.objectives import Objective
from tadfkd.tracking import WandbTracker

# Eight epochs: even on an idle machine (about 0.1 s an epoch) three kills land before the end.
TINY = ["debug=tiny", "trainer.epochs=8", "runtime.device=cpu"]

# A stand-in test set for the in-process loop: one batch of 16x16 digits-shaped images.
TEST_BATCHES = [
    (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8))
]


# -- in process ---------------------------------------------------------------------------------
def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    save_checkpoint(tmp_path, {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path)[0]["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, {"epoch": 1, "weights": torch.ones(4)})
    save_checkpoint(tmp_path, {"epoch": 2, "weights": torch.zeros(4)})
    latest = tmp_path / LATEST
    latest.write_bytes(latest.read_bytes()[:-10])  # a write cut short
    with pytest.warns(UserWarning, match="unusable"):
        state, path = load_checkpoint(tmp_path)
    assert state["epoch"] == 1 and path == tmp_path / PREVIOUS
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte: same length, wrong digest
    (tmp_path / PREVIOUS).write_bytes(bytes(data))
    with pytest.warns(UserWarning):
        assert load_checkpoint(tmp_path) is None


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"epoch": 1})
    real_write = os.write

    def write_half_then_fail(descriptor, data):
        real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_half_then_fail)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[0] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]


def run_stopped_at(distiller, stop_at: tuple[int, int]):
    """Run ``fit``, requesting a stop once (epoch, iteration) is reached; return the
    checkpoint ``fit`` asks for (distiller state and RNG), as the training job saves it."""
    saved = {}
    real_iterate = distiller.iterate

    def iterate():
        real_iterate()
        if (distiller.epoch, distiller.iteration + 1) == stop_at:
            distiller.request_stop("test")

    distiller.iterate = iterate
    distiller.fit(
        TEST_BATCHES,
        progress=False,
        on_checkpoint=lambda: saved.update(state=distiller.state_dict(), rng=rng_state()),
    )
    return saved


def test_a_mid_epoch_stop_resumes_to_the_uninterrupted_weights():
    reference = tiny_distiller("method=basic", "trainer.epochs=2")
    reference.fit(TEST_BATCHES, progress=False)
    stopped = tiny_distiller("method=basic", "trainer.epochs=2")
    saved = run_stopped_at(stopped, (1, 1))  # after iteration 1 of epoch 2
    assert not stopped.finished and saved["state"]["iteration"] == 1
    resumed = tiny_distiller("method=basic", "trainer.epochs=2")
    torch.manual_seed(123)  # whatever the RNG was, the checkpoint's state is restored
    resumed.load_state_dict(saved["state"])
    set_rng_state(saved["rng"])
    resumed.fit(TEST_BATCHES, progress=False)
    assert resumed.finished and len(resumed.history) == 2
    for a, b in zip(
        reference.student.state_dict().values(), resumed.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    keys = set(reference.history[1]) - {schema.EPOCH_SECONDS}
    assert {k: reference.history[1][k] for k in keys} == {k: resumed.history[1][k] for k in keys}


def nan_student_loss(distiller):
    real = distiller.objective.student

    def student(student_logits, teacher_logits):
        loss, terms = real(student_logits, teacher_logits)
        return loss * float("nan"), {name: value * float("nan") for name, value in terms.items()}

    distiller.objective.student = student


def test_a_nonfinite_loss_stops_naming_the_term_and_the_epoch():
    distiller = tiny_distiller("method=basic")
    nan_student_loss(distiller)
    saved = []
    with pytest.raises(NonFiniteLoss, match=r"student loss .*term student.* epoch 1, iteration 1"):
        distiller.fit(TEST_BATCHES, progress=False, on_checkpoint=lambda: saved.append(1))
    # Checked once, at the epoch's end: the non-finite epoch is neither recorded nor saved.
    assert distiller.history == [] and saved == []


def test_on_nonfinite_skip_skips_and_counts_the_steps():
    distiller = tiny_distiller("method=basic", "runtime.on_nonfinite=skip")
    nan_student_loss(distiller)
    distiller.fit(TEST_BATCHES, progress=False)
    history = distiller.history[0]
    assert history[schema.SKIPPED_STUDENT_STEPS_NONFINITE] == 4.0  # 2 iterations x 2 steps
    assert history[schema.SKIPPED_GENERATOR_STEPS_NONFINITE] == 0.0


def test_resuming_with_other_settings_is_refused_but_runtime_settings_may_change():
    def identity(*overrides: str, teacher: str = "a" * 64) -> dict:
        return run_identity(compose_config([*TINY, *overrides], hydra_node=False), teacher)

    base = identity()
    # Every runtime setting, the logger and where files are may change; so may the path of the
    # teacher file, as long as its content is the same.
    same = identity(
        "runtime.progress=false",
        "runtime.image_every=3",
        "runtime.threads=2",
        "runtime.on_nonfinite=skip",
        "logger=none",
        "paths.data=/elsewhere",
        "teacher.checkpoint=/moved/digits_cnn.pt",
    )
    check_same_run(base, same, Path("checkpoint.pt"))
    with pytest.raises(UserError, match="optimizer.student.lr=0.01 there"):
        check_same_run(base, identity("optimizer.student.lr=0.5"), Path("checkpoint.pt"))
    with pytest.raises(UserError, match="another teacher file: its content differs"):
        check_same_run(base, identity(teacher="b" * 64), Path("checkpoint.pt"))


# -- through run.py -----------------------------------------------------------------------------
def start(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return start_entry(*TINY, *overrides, f"hydra.run.dir={run_dir}", env=env)


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """The process's output lines as they come (None at the end)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for(lines: queue.Queue, prefix: str) -> bool:
    """Read lines until one starts with ``prefix`` (True) or the output ends (False)."""
    while (line := lines.get(timeout=120)) is not None:
        if line.startswith(prefix):
            return True
    return False


def outcome(run_dir: Path) -> tuple[dict, dict]:
    """results.json without timings, and the final student weights."""
    results = json.loads((run_dir / schema.RESULTS_FILE).read_text())
    for key in (schema.WALL_TIME, "wandb_run_id"):
        results.pop(key)
    for metrics in results[schema.HISTORY]:
        metrics.pop(schema.EPOCH_SECONDS)
    return results, torch.load(run_dir / "student.pt", weights_only=True)


def assert_same_outcome(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = start(run_dir, "logger=none")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return outcome(run_dir)


@pytest.mark.slow
def test_a_run_killed_three_times_ends_exactly_as_an_uninterrupted_run(tmp_path, uninterrupted):
    draw = random.Random(0)
    kills = 0
    # First kill at a random moment of the first epoch, then one a random moment after each
    # next epoch line: mid-epoch or between epochs, wherever the delay lands.
    for prefix, longest_delay in (("teacher ", 0.3), ("epoch ", 0.1), ("epoch ", 0.1)):
        process = start(tmp_path, "logger=none")
        lines = lines_of(process)
        assert wait_for(lines, prefix)
        time.sleep(draw.uniform(0.0, longest_delay))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    assert kills == 3
    finish = start(tmp_path, "logger=none")
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output[-3000:]
    assert "resuming from" in output
    assert_same_outcome(outcome(tmp_path), uninterrupted)
    again = start(tmp_path, "logger=none")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "already finished" in output and "done:" in output


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_the_same_wandb_run(tmp_path, uninterrupted):
    env = environment(WANDB_API_KEY="secret-marker")
    process = start(tmp_path, "logger=wandb", env=env)
    lines = lines_of(process)
    assert wait_for(lines, "epoch 1/")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output = "".join(iter(lines.get, None))
    assert process.returncode == 3, output[-3000:]
    assert "stopped: SIGTERM received; checkpoint saved after" in output
    first_id = load_checkpoint(tmp_path)[0]["wandb_run_id"]
    finish = start(tmp_path, "logger=wandb", env=env)
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["wandb_run_id"] == first_id
    assert_same_outcome(outcome(tmp_path), uninterrupted)
    leaks = subprocess.run(["grep", "-rl", "secret-marker", str(tmp_path)], capture_output=True)
    assert leaks.stdout == b"", f"API key written to {leaks.stdout.decode()}"


def test_a_nonfinite_loss_in_training_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, tiny_job
):
    real = Objective.student
    calls = []

    def student(self, student_logits, teacher_logits):
        calls.append(1)
        loss, terms = real(self, student_logits, teacher_logits)
        return (loss * float("nan"), terms) if len(calls) > 4 else (loss, terms)  # epoch 2 on

    monkeypatch.setattr(Objective, "student", student)
    OmegaConf.update(tiny_job, "trainer.epochs", 3)
    with pytest.raises(NonFiniteLoss, match="epoch 2, iteration 1.*last good checkpoint is kept"):
        distil(tiny_job, tmp_path)
    assert load_checkpoint(tmp_path)[0]["distiller"]["epoch"] == 1


def test_a_wandb_error_while_logging_warns_once_and_training_goes_on():
    class BrokenRun:
        def log(self, *args, **kwargs):
            raise ConnectionError("server error 500")

    tracker = WandbTracker.__new__(WandbTracker)  # no wandb.init: only the logging path
    tracker.run, tracker._failed = BrokenRun(), False
    with pytest.warns(UserWarning, match="W&B log failed.*training goes on") as caught:
        tracker.log({schema.STUDENT_ACC: 0.5}, step=1)
        tracker.log({schema.STUDENT_ACC: 0.6}, step=2)
    assert len(caught) == 1
