"""The sweep report on hand-made run directories: numbers, partial sweeps, failed jobs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tadfkd import report
from tadfkd.errors import UserError

TEACHER_ACC = {"good": 0.98, "hard": 0.90}


def make_job(sweep: Path, name: str, method: str, teacher: str, seed: int, accs=None, fail=None):
    """A run directory as run.py leaves it: .hydra/config.yaml plus results.json or failed.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "method": {"name": method},
        "teacher": {"name": teacher},
        "student": {"arch": "digits_cnn_s"},
        "dataset": {"name": "digits"},
    }
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if accs is not None:
        history = [
            {"epoch": i + 1, "acc/student": acc, "health/agreement": acc, "selection/rate": 0.5}
            for i, acc in enumerate(accs)
        ]
        results = {
            "student_final_acc": accs[-1],
            "student_best_acc": max(accs),
            "student_last10_acc": float(np.mean(accs[-10:])),
            "teacher_acc": TEACHER_ACC[teacher],
            "epoch_accs": accs,
            "dataset": "digits",
            "teacher": teacher,
            "student": "digits_cnn_s",
            "method": method,
            "seed": seed,
            "epochs": len(accs),
            "wall_time_s": 1.0,
            "history": history,
        }
        (job / "results.json").write_text(json.dumps(results))
    if fail is not None:
        (job / "failed.json").write_text(json.dumps({"error_type": "RuntimeError", "error": fail}))
    return job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep_digits_test"
    make_job(root, "0_a", "tadfkd", "good", 0, [0.5, 0.9])
    make_job(root, "1_b", "tadfkd", "hard", 0, [0.6, 0.4])  # 0.4 < 0.5 x 0.90: collapsed
    make_job(root, "2_c", "basic", "good", 0, [0.3, 0.2])
    make_job(root, "3_d", "basic", "hard", 0, fail="CUDA out of memory")
    make_job(root, "10_e", "basic", "good", 1)  # started, no result yet
    return root


def test_summary_numbers_per_method_and_accuracy(sweep, tmp_path):
    runs = report.read_sweep_directory(sweep)
    assert [run.name for run in runs] == ["0_a", "1_b", "2_c", "3_d", "10_e"]
    assert [run.status for run in runs] == ["done", "done", "done", "failed", "running"]
    rows = report.write_report(runs, str(sweep), tmp_path / "out")
    by_key = {(row["method"], row["accuracy"]): row for row in rows}
    final = by_key["tadfkd", "final"]
    assert final["mean"] == pytest.approx(0.65) and final["std"] == pytest.approx(0.25)
    assert final["worst"] == pytest.approx(0.4) and final["collapse_rate"] == pytest.approx(0.5)
    assert by_key["tadfkd", "best"]["mean"] == pytest.approx(0.75)
    assert by_key["tadfkd", "last10"]["mean"] == pytest.approx((0.7 + 0.5) / 2)
    basic = by_key["basic", "final"]
    assert (basic["jobs"], basic["done"], basic["failed"], basic["running"]) == (3, 1, 1, 1)
    assert basic["mean"] == pytest.approx(0.2) and basic["collapse_rate"] == 1.0


def test_files_say_partial_and_list_failed_and_running_jobs(sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Partial sweep" in text and "3_d" in text and "CUDA out of memory" in text
    assert "10_e (basic, good, seed 1)" in text
    assert "| tadfkd | 2 / 2 | 0 | final | 65.0 ± 25.0 | 40.0 | 50 |" in text
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["mean"]) == pytest.approx(0.65)  # fractions in the csv
    with (out / "runs.csv").open() as handle:
        jobs = {row["job"]: row for row in csv.DictReader(handle)}
    assert jobs["3_d"]["status"] == "failed" and jobs["0_a"]["health/agreement"] == "0.9"
    for plot in ("curves.png", "health.png"):
        assert (out / plot).stat().st_size > 1000


def test_collapse_threshold_is_configurable(sweep, tmp_path):
    rows = report.write_report(report.read_sweep_directory(sweep), "s", tmp_path, 0.3)
    final = next(row for row in rows if row["method"] == "tadfkd" and row["accuracy"] == "final")
    assert final["collapse_rate"] == 0.0
    with pytest.raises(UserError, match="collapse-below"):
        report.write_report([], "s", tmp_path, 1.5)


def test_empty_directory_and_unreachable_wandb_are_one_sentence(tmp_path, monkeypatch, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "holds no run directories" in capsys.readouterr().err
    wandb = pytest.importorskip("wandb")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", offline)
    assert report.main(["sweep_digits_2026", "--out", str(tmp_path / "w")]) == 2
    assert "could not read W&B group 'sweep_digits_2026'" in capsys.readouterr().err
