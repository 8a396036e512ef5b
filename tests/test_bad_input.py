"""Every bad input of the README's bad-input table, driven through ``run.py``: it ends before
any training, in one sentence, with exit code 2 (Hydra's own message and code for an unknown
option), and leaves no checkpoint behind.

The runs fail fast, so they are started together (a few at a time) by one fixture and each test
reads its own outcome.
"""

import fcntl
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import ROOT, compose_config, run_entry, tiny_distiller

from tadfkd.models import build_classifier
from tadfkd.run.checkpoint import LATEST, PREVIOUS, rng_state, save_checkpoint
from tadfkd.run.checks import run_identity
from tadfkd.run.rundir import LOCK_FILE
from tadfkd.teachers.loading import teacher_sha256

DIGITS_TEACHER = ROOT / "Pretrained_Teachers" / "digits" / "digits_cnn.pt"
# case id -> (overrides, expected exit code, fragments of the message); {tmp} is a scratch dir
CASES = {
    "missing teacher file": (["teacher.checkpoint={tmp}/nowhere.pt"], 2, ["does not exist"]),
    "unreadable teacher file": (["teacher.checkpoint={tmp}/garbage.pt"], 2, ["corrupted"]),
    "teacher file is a FIFO": (["teacher.checkpoint={tmp}/fifo"], 2, ["not a regular file"]),
    "teacher file is a device": (["teacher.checkpoint=/dev/zero"], 2, ["not a regular file"]),
    "integer teacher weights": (["teacher.checkpoint={tmp}/ints.pt"], 2, ["not floating point"]),
    "non-finite teacher weights": (["teacher.checkpoint={tmp}/nan.pt"], 2, ["NaN or infinite"]),
    "unknown option": (["trainer.nonsense=1"], 1, ["Could not override 'trainer.nonsense'"]),
    "override with no key": (["=3"], 2, ["the override '=3' names no key"]),
    "zero batch size": (["trainer.batch_size=0"], 2, ["trainer.batch_size=0 must be"]),
    "negative batch size": (["trainer.batch_size=-8"], 2, ["trainer.batch_size=-8 must be"]),
    "batch size beyond memory": (["trainer.batch_size=1000000000"], 2, ["out of memory"]),
    "zero student lr": (["optimizer.student.lr=0"], 2, ["optimizer.student.lr=0 must be"]),
    "negative generator lr": (["optimizer.generator.lr=-1e-3"], 2, ["optimizer.generator.lr"]),
    "negative momentum": (["optimizer.student.momentum=-0.5"], 2, ["momentum=-0.5 must be"]),
    "zero epochs": (["trainer.epochs=0"], 2, ["trainer.epochs=0 must be a whole number"]),
    "fractional epochs": (["trainer.epochs=1.5"], 2, ["trainer.epochs=1.5 must be a whole"]),
    "boolean epochs": (["trainer.epochs=true"], 2, ["trainer.epochs=True must be a whole"]),
    "seed not a number": (["seed=abc"], 2, ["seed='abc' must be a whole number from 0"]),
    "seed out of range": (["seed=1e20"], 2, ["seed=1e+20 must be a whole number from 0"]),
    "threshold above 1": (["selection.threshold=1.5"], 2, ["selection.threshold=1.5", "between"]),
    "threshold 0": (["selection.threshold=0"], 2, ["selection.threshold=0 must be"]),
    "threshold not a number": (["selection.threshold=abc"], 2, ["selection.threshold='abc'"]),
    "zero EM iterations": (["selection.max_iter=0"], 2, ["selection.max_iter=0 must be"]),
    "negative covariance regulariser": (["selection.reg_covar=-1"], 2, ["reg_covar=-1 must be"]),
    "zero covariance regulariser": (["selection.reg_covar=0"], 2, ["reg_covar=0 must be a pos"]),
    "image size not divisible by 4": (["dataset.image_size=30"], 2, ["positive multiple of 4"]),
    "image size 0": (["dataset.image_size=0"], 2, ["dataset.image_size=0 must be"]),
    "negative crop padding": (["dataset.views.crop_padding=-1"], 2, ["crop_padding=-1 must be"]),
    "negative augmentation padding": (
        ["dataset.augmentation.crop_padding=-1"],
        2,
        ["dataset.augmentation.crop_padding=-1 must be"],
    ),
    "zero noise size": (["generator.nz=0"], 2, ["generator.nz=0 must be"]),
    "negative workers": (["runtime.num_workers=-1"], 2, ["runtime.num_workers=-1 must be"]),
    "negative image interval": (["runtime.image_every=-1"], 2, ["runtime.image_every=-1"]),
    "meta device": (["runtime.device=meta"], 2, ["runtime.device=meta", "cannot train"]),
    "teacher/dataset classes": (["dataset=cifar100"], 2, ["10 classes", "100"]),
    "student/teacher classes": (["student.num_classes=5"], 2, ["student", "5 classes"]),
    "unknown on_nonfinite": (["runtime.on_nonfinite=maybe"], 2, ["runtime.on_nonfinite='maybe'"]),
    "keep_freed_memory not a boolean": (
        ["runtime.keep_freed_memory=maybe"],
        2,
        ["runtime.keep_freed_memory='maybe' must be true or false"],
    ),
    "deleted speed setting": (["~speed.scoring"], 2, ["speed.scoring is missing from the config"]),
    "deleted depthwise switch": (["~speed.depthwise_output"], 2, ["speed.depthwise_output is"]),
    "fused generation not a switch": (
        ["speed.fused_generation=maybe"],
        2,
        ["speed.fused_generation='maybe' must be"],
    ),
    "single-channel kernel not a switch": (
        ["speed.single_channel_conv=maybe"],
        2,
        ["speed.single_channel_conv='maybe' must be"],
    ),
    "Winograd kernel not a switch": (
        ["speed.winograd_conv=maybe"],
        2,
        ["speed.winograd_conv='maybe' must be"],
    ),
    "Winograd tile neither 2 nor 4": (
        ["speed.winograd_tile=3"],
        2,
        ["speed.winograd_tile=3 must be 2 or 4."],
    ),
    "Winograd tile a boolean": (
        ["speed.winograd_tile=true"],
        2,
        ["speed.winograd_tile=True must be 2 or 4."],
    ),
    "first-layer kernel with gradients not a switch": (
        ["speed.single_channel_training=maybe"],
        2,
        ["speed.single_channel_training='maybe' must be"],
    ),
    "fused pooling not a switch": (
        ["speed.fused_pooling=maybe"],
        2,
        ["speed.fused_pooling='maybe' must be"],
    ),
    "mixture kernel not a switch": (
        ["speed.mixture_kernel=maybe"],
        2,
        ["speed.mixture_kernel='maybe' must be"],
    ),
    "unknown logger mode": (["logger.mode=onlien"], 2, ["logger.mode='onlien' must be"]),
    "unwritable output dir": (["hydra.run.dir=/dev/null/run"], 2, ["not writable"]),
    "run directory in use": ([], 2, ["/run is in use by another run (process {pid})"]),
    "resume without checkpoint": (["resume={tmp}"], 2, ["holds no checkpoint.pt"]),
    "resume with other settings": (["seed=7"], 2, ["other settings", "seed=0 there"]),
    "resume with another teacher": (
        ["teacher.checkpoint={tmp}/other_teacher.pt"],
        2,
        ["another teacher file: its content differs"],
    ),
    "checkpoints both unusable": (
        [],
        2,
        [f"{LATEST} and ", f"{PREVIOUS} are both unusable", "move them away to start the run"],
    ),
    "teacher of another dataset": (
        ["teacher.checkpoint={tmp}/fmnist_teacher.pt"],
        2,
        ["was trained on fashion_mnist", "not on dataset digits", "check_teacher_dataset=false"],
    ),
    "negative loss weight": (
        ["method.generator_terms.bn.weight=-100"],
        2,
        ["method.generator_terms.bn.weight=-100", "at least 0"],
    ),
    "unknown loss term class": (
        ["method.generator_terms.bn._target_=tadfkd.distillation.terms.BNStats"],
        2,
        ["method.generator_terms.bn._target_='tadfkd.distillation.terms.BNStats'", "imported"],
    ),
    "infinite temperature": (
        ["method.generator_terms.adversarial.temperature=inf"],
        2,
        ["method.generator_terms.adversarial.temperature=inf must be a finite positive"],
    ),
    "infinite learning rate": (["optimizer.student.lr=inf"], 2, ["lr=inf must be a finite"]),
    "zero teacher std": (["teacher.std=[0]"], 2, ["teacher.std=[0] must be a list of positive"]),
    "teacher mean not a number": (["teacher.mean=[abc]"], 2, ["teacher.mean=['abc'] must be"]),
    "empty teacher checkpoint": (["teacher.checkpoint="], 2, ["teacher.checkpoint='' must be"]),
    "negative W&B timeout": (["logger.init_timeout=-5"], 2, ["logger.init_timeout=-5 must be"]),
    "empty W&B project": (["logger.project="], 2, ["logger.project='' must be a name"]),
}
# cases that keep the W&B logger (the others run with logger=none)
WITH_WANDB = ("unknown logger mode", "negative W&B timeout", "empty W&B project")
# cases whose run directory holds a checkpoint of an earlier run (seed 0, the shipped teacher)
WITH_CHECKPOINT = (
    "resume with other settings",
    "resume with another teacher",
    "checkpoints both unusable",
)


def start(case: str, tmp: Path):
    overrides, _, _ = CASES[case]
    overrides = [item.format(tmp=tmp) for item in overrides]
    if not any(item.startswith("hydra.run.dir=") for item in overrides):
        overrides.append(f"hydra.run.dir={tmp / 'run'}")
    defaults = [] if case in WITH_WANDB else ["logger=none"]
    return run_entry(*defaults, "runtime.device=cpu", *overrides, timeout=300)


def write_teachers(scratch: dict[str, Path]) -> None:
    """The files the cases need: teacher files, and the checkpoints of earlier runs."""
    (scratch["unreadable teacher file"] / "garbage.pt").write_bytes(b"not a checkpoint" * 64)
    os.mkfifo(scratch["teacher file is a FIFO"] / "fifo")
    weights = build_classifier("digits_cnn", 10, 1).state_dict()
    ints = {key: value.long() for key, value in weights.items()}
    torch.save(ints, scratch["integer teacher weights"] / "ints.pt")
    nan = {key: value.clone() for key, value in weights.items()}
    nan["classifier.weight"][0, 0] = float("nan")
    torch.save(nan, scratch["non-finite teacher weights"] / "nan.pt")
    torch.save(weights, scratch["resume with another teacher"] / "other_teacher.pt")
    fmnist = scratch["teacher of another dataset"] / "fmnist_teacher.pt"
    torch.save(weights, fmnist)
    fmnist.with_suffix(".json").write_text(json.dumps({"dataset": "fashion_mnist"}))
    cfg = compose_config(["logger=none", "runtime.device=cpu"], hydra_node=False)
    state = {
        "identity": run_identity(cfg, teacher_sha256(DIGITS_TEACHER)),
        "distiller": tiny_distiller().state_dict(),
        "rng": rng_state(),
        "wandb_run_id": None,
    }
    for case in WITH_CHECKPOINT:
        (scratch[case] / "run").mkdir()
        save_checkpoint(scratch[case] / "run", state)
    damaged = scratch["checkpoints both unusable"] / "run"
    save_checkpoint(damaged, state)  # the first one becomes checkpoint.prev.pt
    for name in (LATEST, PREVIOUS):
        (damaged / name).write_bytes((damaged / name).read_bytes()[:-10])  # writes cut short


def hold_lock(run_dir: Path) -> int:
    """Lock ``run_dir`` as a live run does (this test process stands for it); returns the
    lock's descriptor (closing it releases the lock)."""
    run_dir.mkdir()
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in run_dir.glob("checkpoint*.pt")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict[str, Path]:
    """Each case's scratch folder, with the files it needs."""
    folders = {case: tmp_path_factory.mktemp("bad") for case in CASES}
    write_teachers(folders)
    return folders


@pytest.fixture(scope="module")
def checkpoints_before(scratch) -> dict[str, dict[str, bytes]]:
    """The checkpoint files that each ``WITH_CHECKPOINT`` case finds in its run directory."""
    return {case: checkpoints(scratch[case] / "run") for case in WITH_CHECKPOINT}


@pytest.fixture(scope="module")
def outcomes(scratch, checkpoints_before) -> dict:
    lock = hold_lock(scratch["run directory in use"] / "run")
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {case: pool.submit(start, case, scratch[case]) for case in CASES}
            return {case: (scratch[case], future.result()) for case, future in futures.items()}
    finally:
        os.close(lock)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_before_any_work_in_one_sentence(case, outcomes, checkpoints_before):
    _, code, fragments = CASES[case]
    tmp, result = outcomes[case]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    if code == 2:
        assert message.startswith("error: ") and message.count("; ") <= 3, message
    for fragment in fragments:
        fragment = fragment.format(pid=os.getpid())
        assert fragment in result.stderr, result.stderr[-2000:]
    assert "epoch 1/" not in result.stdout  # no training happened
    if case in WITH_CHECKPOINT:  # the earlier run's checkpoints are untouched
        assert checkpoints(tmp / "run") == checkpoints_before[case]
    else:
        assert not (tmp / "run" / LATEST).exists()
