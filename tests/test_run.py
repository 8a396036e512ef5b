"""``run.py`` end to end as a user runs it: the digits default, the published presets on tiny
files in the real on-disk formats, and the one-sentence errors for user mistakes."""

import json

import pytest
import torch
from fakedata import write_fake_cifar, write_fake_fashion_mnist, write_fake_tinyimagenet
from helpers import assert_user_error, run_entry, save_random_teacher

from tadfkd.base import schema
from tadfkd.models import build_classifier

# one epoch of one iteration of one student step at batch 8, with an image grid
TINY = ["debug=tiny", "trainer.iters_per_epoch=1", "trainer.student_steps=1"]
TINY += ["trainer.batch_size=8", "runtime.eval_batch_size=16", "runtime.image_every=1"]
TINY += ["runtime.num_workers=0"]
RESULT_KEYS = {
    *schema.ACCURACY_FIELDS,
    schema.TEACHER_ACC_FIELD,
    schema.EPOCH_ACCS,
    schema.HISTORY,
    schema.WALL_TIME,
    *schema.LABEL_FIELDS,
}


def run(*overrides: str):
    return run_entry(*overrides)


@pytest.mark.slow
def test_digits_default_writes_results_wandb_files_and_images(tmp_path):
    result = run(*TINY, "logger=wandb", f"hydra.run.dir={tmp_path}")
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
        f"paths.data={tmp_path / 'data'}",
        "runtime.download=false",
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
        f"paths.data={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["student"] == "tiny_resnet34"


@pytest.mark.slow
def test_the_fashion_mnist_preset_runs_one_tiny_epoch_on_idx_files(tmp_path):
    # Files written in the official format, so that the test needs neither `make data` nor a
    # download; the preset's shipped teacher and student.
    write_fake_fashion_mnist(tmp_path / "data" / "FashionMNIST" / "raw", n_train=8, n_test=64)
    result = run(
        "experiment=fashion_mnist",
        *TINY,
        f"paths.data={tmp_path / 'data'}",
        "runtime.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "fashion_mnist" and results["teacher"] == "fmnist_cnn"
    assert results["student"] == "digits_cnn_s" and len(results["epoch_accs"]) == 1
    assert (tmp_path / "run" / "samples_epoch0001.png").exists()


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
        f"paths.data={tmp_path / 'empty'}",
        "runtime.download=false",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_user_error(result, "CIFAR-10", str(tmp_path / "empty"))


def test_teacher_and_dataset_class_mismatch_is_one_sentence(tmp_path):
    result = run("dataset=cifar100", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_user_error(result, "10 classes", "100")


def test_cfg_job_prints_the_config():  # --help: tests/test_command_line.py
    job = run("--cfg", "job").stdout
    assert "iters_per_epoch: 36" in job and "threshold: 0.5" in job
