"""``run.py`` end to end as a user runs it: the digits default, the published presets on tiny
files in the real on-disk formats, and the one-sentence errors for user mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from fakedata import write_fake_cifar, write_fake_tinyimagenet

from tadfkd.models import build_classifier

TINY = [
    "trainer.epochs=1",
    "trainer.iters_per_epoch=1",
    "trainer.student_steps=1",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=16",
    "trainer.num_workers=0",
    "trainer.image_every=1",
]
RESULT_KEYS = {
    "student_final_acc",
    "student_best_acc",
    "student_last10_acc",
    "teacher_acc",
    "epoch_accs",
    "dataset",
    "teacher",
    "student",
    "method",
    "seed",
    "epochs",
    "wall_time_s",
}


def run(*overrides: str, entry: str = "run.py", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env["TADFKD_ROOT"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / entry), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def save_random_teacher(path: Path, arch: str, num_classes: int) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_classifier(arch, num_classes).state_dict(), path)
    return path


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.slow
def test_digits_default_writes_results_wandb_files_and_images(tmp_path):
    result = run(*TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["dataset"] == "digits" and results["method"] == "tadfkd"
    assert len(results["epoch_accs"]) == 1 and results["seed"] == 0
    for key in ("student_final_acc", "student_best_acc", "student_last10_acc", "teacher_acc"):
        assert 0.0 <= results[key] <= 1.0
    assert results["teacher_acc"] >= 0.97
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B files live in the run dir"
    assert (tmp_path / "samples_epoch0001.png").exists()
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert "student final test accuracy" in result.stdout and "teacher" in result.stdout


@pytest.mark.slow
def test_published_cifar10_preset_runs_one_epoch_on_cifar_format_files(tmp_path):
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=8, n_test=16)
    teacher = save_random_teacher(tmp_path / "CIFAR10_9546.pt", "resnet34", 10)
    result = run(
        "experiment=cifar10",
        *TINY,
        f"teacher.checkpoint={teacher}",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "cifar10" and results["student"] == "resnet18"
    assert results["teacher"] == "cifar10_resnet34_9546"


@pytest.mark.slow
def test_published_tinyimagenet_preset_runs_one_epoch_on_the_archive_layout(tmp_path):
    write_fake_tinyimagenet(
        tmp_path / "data", n_classes=200, n_train_per_class=1, n_val_per_class=1
    )
    teacher = save_random_teacher(tmp_path / "TINY_7550.pt", "tiny_resnet34", 200)
    result = run(
        "experiment=tinyimagenet",
        *TINY,
        "trainer.batch_size=4",
        f"teacher.checkpoint={teacher}",
        f"dataset.root={tmp_path / 'data'}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["student"] == "tiny_resnet34"


def test_missing_teacher_file_is_one_sentence(tmp_path):
    missing = tmp_path / "nowhere.pt"
    result = run(f"teacher.checkpoint={missing}", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_user_error(result, str(missing), "does not exist")


def test_checkpoint_of_another_architecture_is_one_sentence(tmp_path):
    wrong = save_random_teacher(tmp_path / "resnet.pt", "digits_resnet", 10)
    result = run(f"teacher.checkpoint={wrong}", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_user_error(result, str(wrong), "digits_cnn")


def test_checkpoint_with_another_class_count_is_one_sentence(tmp_path):
    torch.manual_seed(0)
    wrong = tmp_path / "digits_cnn_5.pt"
    torch.save(build_classifier("digits_cnn", 5, 1).state_dict(), wrong)
    result = run(f"teacher.checkpoint={wrong}", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_user_error(result, str(wrong), "5")


def test_missing_dataset_is_one_sentence(tmp_path):
    teacher = save_random_teacher(tmp_path / "CIFAR10_9546.pt", "resnet34", 10)
    result = run(
        "experiment=cifar10",
        f"teacher.checkpoint={teacher}",
        f"dataset.root={tmp_path / 'empty'}",
        "dataset.download=false",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_user_error(result, "CIFAR-10", str(tmp_path / "empty"))


def test_teacher_and_dataset_class_mismatch_is_one_sentence(tmp_path):
    result = run("dataset=cifar100", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_user_error(result, "10 classes", "100")


def test_help_lists_the_groups_and_cfg_job_prints_the_config():
    help_text = run("--help").stdout
    for group in (
        "dataset",
        "teacher",
        "student",
        "generator",
        "selection",
        "optimizer",
        "method",
        "logger",
        "experiment",
    ):
        assert f"{group}:" in help_text
    job = run("--cfg", "job").stdout
    assert "iters_per_epoch: 36" in job and "threshold: 0.5" in job
