"""Sweeps: the presets compose, a small sweep runs through the submitit local launcher (the
code path SLURM uses) and the report's numbers match the jobs' results.json, a failed job is
recorded and the sweep carries on, and every job of a sweep shares one W&B group."""

import csv
import json

import numpy as np
import pytest
from helpers import ROOT, compose_config, options, run_entry
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tadfkd.analysis.sweep import SweepReport
from tadfkd.run.context import JobContext, hydra_context
from tadfkd.run.tracking import run_group

TINY = ["debug=tiny", "trainer.epochs=2", "trainer.iters_per_epoch=1", "trainer.student_steps=1"]
TINY += ["trainer.batch_size=8", "runtime.eval_batch_size=256"]


def multirun(*overrides, timeout=900):
    return run_entry("-m", *overrides, timeout=timeout)


def report(*args):
    return run_entry(*args, entry="-m tadfkd.report", timeout=300)


@pytest.mark.parametrize("preset", options("sweep"))
def test_every_sweep_preset_composes_with_teachers_methods_and_seeds(preset):
    cfg = compose_config([f"sweep={preset}"])
    params = cfg.hydra.sweeper.params
    assert {"teacher", "method", "seed"} <= set(params)
    assert len(str(params.seed).split(",")) >= 2
    assert f"sweep_{preset}" in cfg.hydra.sweep.dir
    assert cfg.report is True  # the presets write their report when the last job ends
    for method in str(params.method).split(","):
        assert method in options("method")


def test_digits_preset_is_the_default_schedule_over_the_zoo():
    cfg = compose_config(["sweep=digits"])
    assert cfg.dataset.name == "digits" and cfg.hydra.sweeper.params.teacher == "glob(digits_*)"
    default = compose_config()
    assert cfg.trainer == default.trainer  # where students learn, not a smoke schedule


def test_plan_lists_every_job_of_a_preset_and_launches_nothing(tmp_path):
    result = multirun("sweep=digits", "plan=true", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    teachers = [teacher for teacher in options("teacher") if teacher.startswith("digits_")]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"plan: {len(teachers) * 4 * 3} jobs into")
    jobs = [line for line in lines if line.startswith("  #")]
    assert len(jobs) == len(teachers) * 4 * 3
    assert "teacher=digits_cnn " in jobs[0] + " " and "method=tadfkd" in jobs[0]
    assert not (tmp_path / "sweep").exists()  # nothing launched


def test_launcher_presets_pick_submitit_and_cap_parallel_jobs():
    local = compose_config(["hydra/launcher=local"]).hydra
    assert local.launcher._target_.endswith("LocalLauncher")
    assert local.sweeper.max_batch_size == 2
    slurm = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra
    assert slurm.launcher._target_.endswith("SlurmLauncher")
    assert slurm.launcher.gpus_per_node == 1 and slurm.launcher.max_num_timeout > 0
    assert slurm.launcher.additional_parameters.requeue is True
    assert slurm.sweeper.max_batch_size == slurm.launcher.array_parallelism


def test_jobs_of_one_sweep_share_the_sweep_directory_name_as_wandb_group(tmp_path):
    cfg = compose_config(["hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/sweep_digits_x"])
    cfg.hydra.runtime.output_dir = str(tmp_path)  # set by Hydra when a job starts
    HydraConfig.instance().set_config(cfg)
    try:
        context = hydra_context(cfg)  # what run.py reads from Hydra, once
    finally:
        HydraConfig.instance().cfg = None
    assert context.multirun and context.sweep_dir.name == "sweep_digits_x"
    assert context.run_dir == tmp_path and context.side_by_side == 1  # the basic launcher
    assert run_group(cfg, context) == "sweep_digits_x"
    cfg.logger.group = "mine"
    assert run_group(cfg, context) == "mine"
    assert run_group(compose_config(), JobContext(tmp_path)) is None  # a single run has none


@pytest.mark.slow
def test_local_submitit_sweep_then_report_matches_the_results(tmp_path):
    sweep_dir = tmp_path / "sweep_small"
    result = multirun(
        "hydra/launcher=local",
        "hydra.sweeper.max_batch_size=4",
        "teacher=digits_cnn,digits_cnn_w",
        "method=tadfkd,basic",
        *TINY,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep {sweep_dir}: 4 jobs, 4 done, 0 failed" in result.stdout
    assert (sweep_dir / ".submitit").is_dir(), "the jobs ran through submitit"
    results = [json.loads(path.read_text()) for path in sweep_dir.glob("*/results.json")]
    assert len(results) == 4
    assert {(r["teacher"], r["method"]) for r in results} == {
        (teacher, method)
        for teacher in ("digits_cnn", "digits_cnn_w")
        for method in ("tadfkd", "basic")
    }
    assert all("health/agreement" in r["history"][-1] for r in results)

    out = tmp_path / "report"
    made = report(str(sweep_dir), "--out", str(out))
    assert made.returncode == 0, made.stderr[-3000:]
    with (out / "report.csv").open() as handle:
        rows = {(row["method"], row["accuracy"]): row for row in csv.DictReader(handle)}
    for method in ("tadfkd", "basic"):
        for key, name in (
            ("student_final_acc", "final"),
            ("student_last10_acc", "last10"),
            ("student_best_acc", "best"),
        ):
            values = np.array([r[key] for r in results if r["method"] == method])
            teachers = np.array([r["teacher_acc"] for r in results if r["method"] == method])
            row = rows[method, name]
            assert int(row["n"]) == 2 and int(row["failed"]) == 0
            assert float(row["mean"]) == pytest.approx(values.mean())
            assert float(row["std"]) == pytest.approx(values.std(ddof=1))
            assert float(row["worst"]) == pytest.approx(values.min())
            assert float(row["collapse_rate"]) == pytest.approx(np.mean(values < 0.5 * teachers))
    text = (out / "report.md").read_text()
    mean = np.mean([r["student_final_acc"] for r in results if r["method"] == "tadfkd"])
    assert f"| tadfkd | final | 2 / 2 | {100 * mean:.1f} ± " in text
    assert "Partial sweep" not in text
    assert (out / "curves.png").exists() and (out / "health.png").exists()


@pytest.mark.slow
def test_a_failed_job_is_recorded_and_the_sweep_carries_on(tmp_path):
    missing = tmp_path / "nowhere.pt"
    sweep_dir = tmp_path / "sweep"
    result = multirun(
        f"teacher.checkpoint={missing},{ROOT / 'Pretrained_Teachers/digits/digits_cnn.pt'}",
        *TINY,
        "report=true",
        f"hydra.sweep.dir={sweep_dir}",
    )
    # The sweep carried on, wrote its report, said so in one line, and exits 5.
    assert result.returncode == 5, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"sweep {sweep_dir}: 2 jobs, 1 done, 1 failed (")
    assert summary.endswith(f"report: {sweep_dir / 'report.md'}")
    # the failed job's error reads as in a single run: one sentence, no traceback
    assert f"error: teacher checkpoint {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    failed = list(sweep_dir.rglob("failed.json"))  # path overrides nest run dirs
    assert len(failed) == 1 and len(list(sweep_dir.rglob("results.json"))) == 1
    failure = json.loads(failed[0].read_text())
    assert failure["error_type"] == "UserError" and "Traceback" in failure["traceback"]
    assert str(missing) in failure["error"]
    assert any(str(missing) in override for override in failure["overrides"])
    text = (sweep_dir / "report.md").read_text()
    assert "1 failed" in text and "## Failed or unreadable jobs" in text
    assert "does not exist" in text
    assert OmegaConf.load(sweep_dir / "multirun.yaml")  # Hydra's own record is untouched


def sweep_end(sweep_dir, capsys, report_flag=True) -> tuple[int, str, str]:
    """The end of a multirun over ``sweep_dir``: its exit code, stdout and stderr."""
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "report": report_flag})
    with pytest.raises(SystemExit) as ended:
        SweepReport().on_multirun_end(config)
    out, err = capsys.readouterr()
    return ended.value.code, out, err


def job_dir(sweep_dir, name: str, results: dict | None = None, failed: bool = False):
    """A run directory as run.py leaves it: results.json, failed.json, or neither (unfinished)."""
    folder = sweep_dir / name / ".hydra"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\nmethod: {name: tadfkd}\n")
    if results is not None:
        (folder.parent / "results.json").write_text(json.dumps(results))
    if failed:
        failure = {"error_type": "UserError", "error": "teacher checkpoint x does not exist"}
        (folder.parent / "failed.json").write_text(json.dumps(failure))


FINISHED = {
    "dataset": "digits",
    "teacher": "digits_cnn",
    "student": "digits_cnn_s",
    "method": "tadfkd",
    "seed": 0,
    "student_final_acc": 0.5,
    "student_best_acc": 0.6,
    "student_last10_acc": 0.55,
    "teacher_acc": 0.99,
    "epoch_accs": [0.6, 0.5],
    "history": [],
}


def test_a_report_that_crashes_still_ends_a_failed_sweep_with_its_summary_and_code_5(
    tmp_path, capsys, monkeypatch
):
    job_dir(tmp_path, "0_done", {**FINISHED, "student_final_acc": "abc"})
    job_dir(tmp_path, "1_failed", failed=True)

    def crash(*args, **kwargs):
        raise RuntimeError("a bug in the report")

    monkeypatch.setattr("tadfkd.analysis.report.write_report", crash)
    code, out, err = sweep_end(tmp_path, capsys)
    assert code == 5
    assert out.strip().startswith(f"sweep {tmp_path}: 2 jobs, 0 done, 2 failed")
    [sentence] = err.strip().splitlines()
    assert sentence.startswith("error: the sweep is not complete: 2 jobs failed and the report")
    assert "(RuntimeError: a bug in the report)" in sentence and "Traceback" not in err


def test_a_wrongly_typed_result_is_an_unreadable_job_and_the_report_is_written(tmp_path, capsys):
    job_dir(tmp_path, "0_done", {**FINISHED, "student_final_acc": "abc"})
    job_dir(tmp_path, "1_done", FINISHED)
    code, out, _ = sweep_end(tmp_path, capsys)
    assert code == 5 and "1 done, 1 failed" in out
    assert "student_final_acc is 'abc'" in (tmp_path / "report.md").read_text()


def test_a_job_left_unrun_ends_the_sweep_with_code_6(tmp_path, capsys):
    job_dir(tmp_path, "0_done", FINISHED)
    job_dir(tmp_path, "1_held_by_another_launch")
    code, out, err = sweep_end(tmp_path, capsys)
    assert code == 6 and "1 not finished" in out
    assert "1 job was left unrun or unfinished" in err and "exit code 6" in err


def test_a_report_that_cannot_be_written_ends_the_sweep_with_code_7(tmp_path, capsys):
    job_dir(tmp_path, "0_done", FINISHED)
    (tmp_path / "report.md").mkdir()  # in the report's way
    code, out, err = sweep_end(tmp_path, capsys)
    assert code == 7 and "1 done, 0 failed" in out and "report:" not in out
    assert "the report could not be written (the report cannot be written into" in err


@pytest.mark.slow
def test_relaunching_the_same_sweep_finishes_only_what_is_missing(tmp_path):
    # An interrupted sweep, relaunched with the same command (the same sweep directory): the
    # finished job is left as it is, the missing one runs, and the report counts both.
    sweep_dir = tmp_path / "sweep_relaunch"
    command = [
        "hydra/launcher=local",
        "hydra.sweeper.max_batch_size=2",
        "method=tadfkd,basic",
        *TINY,
        "report=true",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    first = multirun(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(path.parent for path in sweep_dir.glob("*/results.json"))
    assert len(jobs) == 2
    kept, lost = jobs
    kept_bytes = (kept / "results.json").read_bytes()
    for path in sorted(lost.rglob("*"), reverse=True):  # as if the sweep stopped before it
        path.unlink() if path.is_file() else path.rmdir()
    lost.rmdir()

    again = multirun(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep {sweep_dir}: 2 jobs, 2 done, 0 failed" in again.stdout
    assert "already finished; nothing to do" in (kept / "run.log").read_text()
    assert (kept / "results.json").read_bytes() == kept_bytes
    assert json.loads((lost / "results.json").read_text())["method"] in {"tadfkd", "basic"}
    assert "summed over 2 launches" in (sweep_dir / "report.md").read_text()
