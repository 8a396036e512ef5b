"""Every bad input of the README's bad-input table, driven through ``run.py``: it ends before
any work, in one sentence, with exit code 2 (Hydra's own message and code for an unknown option).

The runs fail fast, so they are started together (a few at a time) by one fixture and each test
reads its own outcome.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from test_resume import environment

from tadfkd.checkpoint import LATEST, save_checkpoint
from tadfkd.train import run_identity

# case id -> (overrides, expected exit code, fragments of the message); {tmp} is a scratch dir
CASES = {
    "missing teacher file": (["teacher.checkpoint={tmp}/nowhere.pt"], 2, ["does not exist"]),
    "unreadable teacher file": (["teacher.checkpoint={tmp}/garbage.pt"], 2, ["corrupted"]),
    "unknown option": (["trainer.nonsense=1"], 1, ["Could not override 'trainer.nonsense'"]),
    "zero batch size": (["trainer.batch_size=0"], 2, ["trainer.batch_size=0 must be"]),
    "negative batch size": (["trainer.batch_size=-8"], 2, ["trainer.batch_size=-8 must be"]),
    "zero student lr": (["optimizer.student.lr=0"], 2, ["optimizer.student.lr=0.0 must be"]),
    "negative generator lr": (["optimizer.generator.lr=-1e-3"], 2, ["optimizer.generator.lr"]),
    "zero epochs": (["trainer.epochs=0"], 2, ["trainer.epochs=0 must be a positive integer"]),
    "threshold above 1": (["selection.threshold=1.5"], 2, ["selection.threshold=1.5", "(0, 1)"]),
    "threshold 0": (["selection.threshold=0"], 2, ["selection.threshold=0", "(0, 1)"]),
    "image size not divisible by 4": (["dataset.image_size=30"], 2, ["not divisible by 4"]),
    "teacher/dataset classes": (["dataset=cifar100"], 2, ["10 classes", "100"]),
    "student/teacher classes": (["student.num_classes=5"], 2, ["student", "5 classes"]),
    "unknown on_nonfinite": (["trainer.on_nonfinite=maybe"], 2, ["trainer.on_nonfinite=maybe"]),
    "unwritable output dir": (["hydra.run.dir=/dev/null/run"], 2, ["not writable"]),
    "resume without checkpoint": (["resume={tmp}"], 2, ["holds no checkpoint.pt"]),
    "resume with other settings": (["seed=7"], 2, ["other settings", "seed=0 there"]),
}


def start(case: str, tmp: Path) -> subprocess.CompletedProcess:
    overrides, _, _ = CASES[case]
    overrides = [item.format(tmp=tmp) for item in overrides]
    if not any(item.startswith("hydra.run.dir=") for item in overrides):
        overrides.append(f"hydra.run.dir={tmp / 'run'}")
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "logger=none", "device=cpu", *overrides],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    scratch = {case: tmp_path_factory.mktemp("bad") for case in CASES}
    (scratch["unreadable teacher file"] / "garbage.pt").write_bytes(b"not a checkpoint" * 64)
    # A checkpoint left by a run with seed=0 (the default); resuming it with seed=7 is refused.
    (scratch["resume with other settings"] / "run").mkdir()
    identity = run_identity(compose_config(["logger=none", "device=cpu"]))
    save_checkpoint(scratch["resume with other settings"] / "run", {"identity": identity})
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(start, case, scratch[case]) for case in CASES}
        return {case: (scratch[case], future.result()) for case, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_before_any_work_in_one_sentence(case, outcomes):
    _, code, fragments = CASES[case]
    tmp, result = outcomes[case]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    if code == 2:
        assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]
    assert "epoch 1/" not in result.stdout  # no training happened
    if case != "resume with other settings":
        assert not (tmp / "run" / LATEST).exists()
