"""Full-state checkpoints and resumption: a killed, preempted or interrupted run continues to
exactly the result of an uninterrupted one; damaged checkpoints are never loaded; a non-finite
loss stops (or skips) at the step where it appears."""

import errno
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_fake_cifar
from helpers import (
    assert_user_error,
    compose_config,
    environment,
    run_entry,
    save_random_teacher,
    start_entry,
    tiny_distiller,
)
from omegaconf import OmegaConf

from tadfkd.base import schema
from tadfkd.base.errors import Interrupted, NonFiniteLoss, UserError
from tadfkd.distillation.objectives import Objective
from tadfkd.run import job
from tadfkd.run.checkpoint import (
    LATEST,
    PREVIOUS,
    RNG_KEYS,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tadfkd.run.checks import check_same_run, run_identity
from tadfkd.run.context import JobContext
from tadfkd.run.job import distil
from tadfkd.run.results import STUDENT_FILE
from tadfkd.run.resume import CHECKPOINT_KEYS
from tadfkd.run.tracking import WandbTracker

# Eight epochs: even on an idle machine (about 0.1 s an epoch) three kills land before the end.
# One thread: runtime.threads=auto follows the machine's load, and a run and its resumed copy at
# different thread counts differ in the last bits (oneDNN's reductions).
TINY = ["debug=tiny", "trainer.epochs=8", "runtime.device=cpu", "runtime.threads=1"]

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
    damaged = {name: (tmp_path / name).read_bytes() for name in (LATEST, PREVIOUS)}
    # Neither loads: the run stops, naming both, rather than start over and overwrite them.
    with pytest.warns(UserWarning), pytest.raises(UserError) as refused:
        load_checkpoint(tmp_path)
    message = str(refused.value)
    assert f"{tmp_path / LATEST} and {tmp_path / PREVIOUS} are both unusable" in message
    assert "move them away to start the run over" in message
    assert {name: (tmp_path / name).read_bytes() for name in damaged} == damaged


def test_no_checkpoint_file_is_a_fresh_start(tmp_path):
    assert load_checkpoint(tmp_path, CHECKPOINT_KEYS) is None


class RunsCode:
    """Unpickled without ``weights_only``, this would run code: create the folder ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def job_checkpoint(epoch: int) -> dict:
    """A checkpoint as the job writes it (every key of ``CHECKPOINT_KEYS``)."""
    distiller = tiny_distiller()
    distiller.epoch = epoch
    identity = {"seed": 0, "teacher.sha256": "a" * 64}
    return {
        "identity": identity,
        "distiller": distiller.state_dict(),
        "rng": rng_state(),
        "wandb_run_id": None,
    }


def test_the_job_checks_every_key_it_reads_from_a_checkpoint():
    saved = job_checkpoint(1)
    assert set(CHECKPOINT_KEYS) == set(saved)
    optional = {"grad_scalers", "shared_noise"}  # older checkpoints lack them
    assert set(CHECKPOINT_KEYS["distiller"]) == set(saved["distiller"]) - optional
    assert set(RNG_KEYS) == set(saved["rng"])


def damage(run_dir: Path, how: str, marker: Path) -> None:
    """Replace ``run_dir``'s newest checkpoint by a file with a valid digest that does not load
    (``how``: it carries pickle code, or it lacks a key the job reads)."""
    state = read_checkpoint(run_dir / LATEST)
    if how == "pickle code":
        state["wandb_run_id"] = RunsCode(marker)
    else:
        del state["distiller"]["student_optimizer"]
    scratch = run_dir / "scratch"
    scratch.mkdir()
    save_checkpoint(scratch, state)  # the real format: magic, sha256, payload
    os.replace(scratch / LATEST, run_dir / LATEST)
    scratch.rmdir()


WHY = {
    "pickle code": "objects other than tensors and plain values",
    "missing key": "missing distiller.student_optimizer",
}


@pytest.mark.parametrize("how", WHY)
def test_a_digest_valid_checkpoint_that_does_not_load_is_skipped(tmp_path, how):
    save_checkpoint(tmp_path, job_checkpoint(1))
    save_checkpoint(tmp_path, job_checkpoint(2))
    damage(tmp_path, how, tmp_path / "code-ran")
    with pytest.warns(UserWarning, match=f"{LATEST} is unusable \\(.*{WHY[how]}.*previous one"):
        state, path = load_checkpoint(tmp_path, CHECKPOINT_KEYS)
    assert path == tmp_path / PREVIOUS and state["distiller"]["epoch"] == 1
    assert not (tmp_path / "code-ran").exists()


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


@pytest.mark.parametrize("name", [STUDENT_FILE, schema.RESULTS_FILE])
def test_disk_full_while_writing_the_results_keeps_the_checkpoint_to_write_them(
    tmp_path, monkeypatch, tiny_job, name
):
    real_save, real_write = torch.save, os.write

    def full(path) -> bool:  # only the writes of ``name``'s temporary file fail
        return Path(path).name == f"{name}.tmp"

    def save(obj, file, *args, **kwargs):  # torch writes student.pt through its own C++ writer
        if isinstance(file, str | os.PathLike) and full(file):
            Path(file).write_bytes(b"PK" * 32)  # a first part, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    def write(descriptor, data):
        if full(os.readlink(f"/proc/self/fd/{descriptor}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(UserError) as refused:
        distil(tiny_job, JobContext(tmp_path))
    monkeypatch.undo()
    assert str(refused.value) == (
        f"could not write {tmp_path / name} (No space left on device); the run's checkpoint is "
        "intact, so free some space and re-run the same command to write it."
    )
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.*")), "a temporary file was left behind"
    saved = load_checkpoint(tmp_path, CHECKPOINT_KEYS)[0]["distiller"]
    assert saved["epoch"] == 1  # the finished run's checkpoint
    # the re-run writes both, training nothing again
    results = distil(tiny_job, JobContext(tmp_path))
    assert json.loads((tmp_path / schema.RESULTS_FILE).read_text()) == results
    assert results[schema.EPOCH_ACCS] == [m[schema.STUDENT_ACC] for m in saved["history"]]
    student = torch.load(tmp_path / STUDENT_FILE, weights_only=True)
    assert student.keys() == saved["student"].keys()
    assert all(torch.equal(student[key], saved["student"][key]) for key in student)


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


@pytest.mark.parametrize(
    "setting",
    [
        "speed.depthwise_output",
        "speed.phased_upsampling",
        "speed.fused_pooling",
        "speed.mixture_kernel",
        "speed.single_channel_training",
        "speed.winograd_conv",
    ],
)
def test_a_checkpoint_from_before_a_setting_existed_resumes_with_the_value_it_computed(setting):
    def identity(*overrides: str) -> dict:
        return run_identity(compose_config([*TINY, *overrides], hydra_node=False), "a" * 64)

    former = identity(f"{setting}=false")
    del former[setting]  # written before the setting existed
    check_same_run(former, identity(f"{setting}=false"), Path("checkpoint.pt"))
    with pytest.raises(UserError, match=f"{setting}=False there"):
        check_same_run(former, identity(f"{setting}=auto"), Path("checkpoint.pt"))


def test_a_checkpoint_from_before_the_winograd_tile_resumes_with_round_eighteens_tile():
    def identity(*overrides: str) -> dict:
        return run_identity(compose_config([*TINY, *overrides], hydra_node=False), "a" * 64)

    former = identity("speed.winograd_tile=2")
    del former["speed.winograd_tile"]  # written before the setting existed: F(2x2, 3x3)
    check_same_run(former, identity("speed.winograd_tile=2"), Path("checkpoint.pt"))
    with pytest.raises(UserError, match="speed.winograd_tile=2 there"):
        check_same_run(former, identity(), Path("checkpoint.pt"))  # the default, 4


# The ``method.*`` part of each method's run identity as the code before loss terms were objects
# (commit 078f690) wrote it into its checkpoints: ``method.weights``, ``method.student_loss``, ...
FORMER_METHOD_IDENTITIES = json.loads(
    (Path(__file__).parent / "former_method_identities.json").read_text()
)


def in_former_form(identity: dict, method: str) -> dict:
    """``identity`` with its ``method.*`` keys as the former code wrote them for ``method``."""
    kept = {key: value for key, value in identity.items() if not key.startswith("method.")}
    return kept | FORMER_METHOD_IDENTITIES[method]


@pytest.mark.parametrize("method", sorted(FORMER_METHOD_IDENTITIES))
def test_a_checkpoint_with_the_former_loss_weights_resumes_with_the_same_method(method):
    current = run_identity(compose_config([*TINY, f"method={method}"], hydra_node=False), "a" * 64)
    former = in_former_form(current, method)
    assert not any(key.startswith("method.generator_terms.") for key in former)
    check_same_run(former, current, Path("checkpoint.pt"))
    if "method.weights.bn" in former:  # another weight is still another run
        changed = {**former, "method.weights.bn": 5.0}
        with pytest.raises(UserError, match="method.generator_terms.bn.weight=5.0 there"):
            check_same_run(changed, current, Path("checkpoint.pt"))


def test_a_run_directory_of_the_former_code_resumes_and_trains_on(tmp_path, tiny_job):
    OmegaConf.update(tiny_job, "trainer.epochs", 2)
    uninterrupted = distil(tiny_job, JobContext(tmp_path))
    state = read_checkpoint(tmp_path / PREVIOUS)  # after epoch 1
    for name in (LATEST, PREVIOUS, schema.RESULTS_FILE, STUDENT_FILE):
        (tmp_path / name).unlink()
    state["identity"] = in_former_form(state["identity"], "tadfkd")
    save_checkpoint(tmp_path, state)  # a run the former code stopped after its first epoch
    resumed = distil(tiny_job, JobContext(tmp_path))
    assert resumed[schema.EPOCH_ACCS] == uninterrupted[schema.EPOCH_ACCS]
    identity = read_checkpoint(tmp_path / LATEST)["identity"]  # written again in today's form
    assert identity["method.generator_terms.bn.weight"] == 10.0
    assert "method.weights.bn" not in identity


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
def finished_run(tmp_path_factory) -> Path:
    """The directory of an uninterrupted run: results, student and two checkpoints (epochs 7
    and 8). Tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = start(run_dir, "logger=none")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(finished_run) -> tuple[dict, dict]:
    return outcome(finished_run)


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


@pytest.mark.slow
@pytest.mark.parametrize("how", WHY)
def test_a_latest_checkpoint_that_does_not_load_resumes_from_the_previous(
    tmp_path, finished_run, uninterrupted, how
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir, how, tmp_path / "code-ran")
    process = start(run_dir, "logger=none")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert re.search(f"checkpoint {run_dir / LATEST} is unusable \\(.*{WHY[how]}", output)
    assert f"resuming from {run_dir / PREVIOUS}: 7 of 8 epochs" in output
    assert not (tmp_path / "code-ran").exists()
    assert_same_outcome(outcome(run_dir), uninterrupted)  # nothing lost: epoch 8 done again


@pytest.mark.slow
def test_a_run_whose_checkpoints_both_fail_to_load_stops_and_keeps_them(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir, "pickle code", tmp_path / "code-ran")
    previous = run_dir / PREVIOUS
    previous.write_bytes(previous.read_bytes()[:-10])  # a write cut short
    kept = [run_dir / LATEST, previous, run_dir / schema.RESULTS_FILE, run_dir / STUDENT_FILE]
    before = [path.read_bytes() for path in kept]
    result = run_entry(*TINY, f"hydra.run.dir={run_dir}", timeout=300)
    assert_user_error(
        result,
        f"checkpoint {run_dir / LATEST} and {previous} are both unusable",
        "move them away to start the run over",
    )
    assert "teacher " not in result.stdout and "epoch " not in result.stdout  # no work done
    assert [path.read_bytes() for path in kept] == before


@pytest.mark.slow
def test_a_moved_copy_of_the_teacher_file_resumes(tmp_path, uninterrupted):
    shipped = Path(compose_config(TINY, hydra_node=False).teacher.checkpoint)
    first = tmp_path / "first" / shipped.name
    first.parent.mkdir()
    shutil.copy(shipped, first)
    run_dir = tmp_path / "run"
    process = start(run_dir, "logger=none", f"teacher.checkpoint={first}")
    lines = lines_of(process)
    assert wait_for(lines, "epoch 1/")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == 3, "".join(iter(lines.get, None))[-3000:]
    moved = tmp_path / "elsewhere" / "same_teacher_renamed.pt"  # same content, other path
    moved.parent.mkdir()
    first.rename(moved)
    finish = start(run_dir, "logger=none", f"teacher.checkpoint={moved}")
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output[-3000:]
    assert f"resuming from {run_dir / LATEST}" in output
    assert_same_outcome(outcome(run_dir), uninterrupted)


@pytest.mark.slow
def test_sigterm_while_the_teacher_is_evaluated_exits_3_with_a_message(tmp_path):
    # A ResNet-34 teacher on 3000 test images, one at a time: its evaluation takes minutes on
    # any CPU, so the signal lands in it (it stops the job at once: the test takes seconds).
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=8, n_test=3000)
    teacher = save_random_teacher(tmp_path / "teacher.pt", "resnet34", 10)
    run_dir = tmp_path / "run"
    process = start(
        run_dir,
        "experiment=cifar10",
        f"teacher.checkpoint={teacher}",
        f"paths.data={tmp_path / 'data'}",
        "runtime.download=false",
        "runtime.eval_batch_size=1",
        "logger=none",
    )
    tmp_path = run_dir
    lines = lines_of(process)
    job_starts = tmp_path / ".hydra" / "overrides.yaml"  # Hydra's last write before the job
    deadline = time.monotonic() + 120
    while not job_starts.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output = "".join(iter(lines.get, None))
    assert process.returncode == 3, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "stopped: SIGTERM received outside the training loop; nothing was checkpointed yet; "
        "re-run the same command to start the run."
    )
    assert "Traceback" not in output
    assert "teacher " not in output  # stopped during the evaluation, not after it
    assert not (tmp_path / LATEST).exists()


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
        distil(tiny_job, JobContext(tmp_path))
    assert load_checkpoint(tmp_path)[0]["distiller"]["epoch"] == 1


def sigterm_while_the_teacher_is_evaluated(monkeypatch) -> None:
    """The job's teacher evaluation sends this process a SIGTERM first."""
    real = job.evaluate

    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "evaluate", evaluate)


def test_sigterm_before_training_stops_and_says_nothing_was_checkpointed(
    tmp_path, monkeypatch, tiny_job
):
    before = signal.getsignal(signal.SIGTERM)
    sigterm_while_the_teacher_is_evaluated(monkeypatch)
    with pytest.raises(Interrupted) as stopped:
        distil(tiny_job, JobContext(tmp_path))
    assert str(stopped.value) == (
        "SIGTERM received outside the training loop; nothing was checkpointed yet; re-run the "
        "same command to start the run."
    )
    assert not (tmp_path / LATEST).exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the job's handlers are gone


def test_sigterm_before_a_resumed_run_trains_keeps_its_checkpoint(tmp_path, monkeypatch, tiny_job):
    distil(tiny_job, JobContext(tmp_path))
    (tmp_path / schema.RESULTS_FILE).unlink()  # so that the re-run evaluates the teacher again
    checkpoint = (tmp_path / LATEST).read_bytes()
    sigterm_while_the_teacher_is_evaluated(monkeypatch)
    with pytest.raises(Interrupted, match="SIGTERM received outside the training loop") as stop:
        distil(tiny_job, JobContext(tmp_path))
    assert f"the last checkpoint in {tmp_path} is kept; re-run the same command to resume" in str(
        stop.value
    )
    assert (tmp_path / LATEST).read_bytes() == checkpoint


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
