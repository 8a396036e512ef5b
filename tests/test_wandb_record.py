"""The W&B record of a job, read back from its offline run with wandb's own reader: epochs as
the x axis, the summary, the config a dashboard filters on, the student as a model artifact, an
honest end state for a stopped run, one run per job when one process runs several (a multirun),
readable unique names, and an offline fallback that says why."""

import json
import os
import signal
import warnings

import pytest
import torch
from helpers import assert_user_error, compose_config, read_wandb_run, run_entry

from tadfkd.base import schema
from tadfkd.base.errors import Interrupted, NonFiniteLoss
from tadfkd.distillation.objectives import Objective
from tadfkd.run.context import JobContext
from tadfkd.run.job import distil
from tadfkd.run.tracking import INSTANTIATION_KEYS, WandbTracker, dashboard_config

# one epoch of one iteration of one student step at batch 8
TINY = ["debug=tiny", "trainer.iters_per_epoch=1", "trainer.student_steps=1"]
TINY += ["trainer.batch_size=8", "runtime.eval_batch_size=256"]


def records_of(records: list[dict], kind: str) -> list[dict]:
    return [record[kind] for record in records if record["type"] == kind]


def keys_anywhere(node) -> set[str]:
    """Every dictionary key in a nested config."""
    if isinstance(node, dict):
        return set(node).union(*(keys_anywhere(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(keys_anywhere(item) for item in node))
    return set()


@pytest.mark.slow
def test_a_run_records_epochs_summaries_resolved_config_and_the_student_artifact(tmp_path):
    overrides = [*TINY, "logger=wandb", "runtime.image_every=1", "selection.threshold=0.4"]
    result = run_entry(*overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / schema.RESULTS_FILE).read_text())
    run, records = read_wandb_run(tmp_path)
    assert (run["state"], run["exit_code"]) == ("finished", 0)
    # the name: method, student, teacher, seed, then the other settings given of what is computed
    shrunk = "trainer.iters_per_epoch=1 trainer.student_steps=1 trainer.batch_size=8"
    assert run["name"] == f"tadfkd-digits_cnn_s@digits_cnn-s0 {shrunk} selection.threshold=0.4"

    # epoch: logged in every row and the step metric of every metric
    defined = {m.get("name") or m["glob_name"]: m for m in records_of(records, "metric")}
    assert defined["*"]["step_metric"] == schema.EPOCH
    assert defined[schema.STUDENT_ACC]["step_metric"] == schema.EPOCH
    assert defined[schema.STUDENT_ACC]["summary"] == {"last": True, "max": True}
    rows = [history["item"] for history in records_of(records, "history")]
    assert [row[schema.EPOCH] for row in rows] == [0, 1]
    assert rows[0][schema.TEACHER_ACC] == results[schema.TEACHER_ACC_FIELD]
    assert rows[1][schema.STUDENT_ACC] == results[schema.FINAL_ACC]
    assert rows[1]["samples.width"] == 8 * (64 + 2) + 2  # the upscaled grid

    # the summary: acc/student as its last and its best value, the teacher's accuracy
    summary = run["summary"]
    last_and_best = {"last": results[schema.FINAL_ACC], "max": results[schema.BEST_ACC]}
    assert summary[schema.STUDENT_ACC] == last_and_best
    assert summary[schema.TEACHER_ACC_FIELD] == results[schema.TEACHER_ACC_FIELD]

    # the config: resolved values, the command line and the run directory, no Hydra noise
    config = run["config"]
    assert config["runtime"]["device"] == results["device"] != "auto"
    assert isinstance(config["runtime"]["threads"], int)
    assert config["speed"]["precision"] in ("fp32", "bf16")
    assert config["speed"]["refill"] == "single"  # auto, on the CPU
    assert config["selection"]["threshold"] == 0.4
    assert config["overrides"] == overrides and config["run_dir"] == str(tmp_path)
    assert not keys_anywhere(config) & set(INSTANTIATION_KEYS)

    # student.pt as a model artifact that names its teacher and its run
    [artifact] = records_of(records, "artifact")
    assert (artifact["type"], artifact["name"]) == ("model", f"student-{run['run_id']}")
    [entry] = artifact["manifest"]["contents"]
    assert entry["path"] == "student.pt"
    assert entry["local_path"] == str(tmp_path / "student.pt")  # referenced, not copied
    metadata = json.loads(artifact["metadata"])
    assert metadata["teacher_sha256"] == results["teacher_sha256"]
    assert metadata["teacher"] == "digits_cnn" and metadata["wandb_run_id"] == run["run_id"]
    assert metadata["identity"]["selection.threshold"] == 0.4
    assert metadata["identity"]["teacher.sha256"] == results["teacher_sha256"]


@pytest.mark.slow
def test_two_jobs_of_one_process_are_two_runs_named_apart_in_the_sweeps_group(tmp_path):
    sweep_dir = tmp_path / "sweep_digits_test"
    result = run_entry("-m", *TINY, "logger=wandb", "seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(path.parent for path in sweep_dir.glob("*/results.json"))
    assert len(job_dirs) == 2
    runs = []
    for seed, job_dir in enumerate(job_dirs):
        run, records = read_wandb_run(job_dir)
        [started] = records_of(records, "run")
        assert started["run_group"] == "sweep_digits_test"
        assert run["name"].startswith(f"tadfkd-digits_cnn_s@digits_cnn-s{seed} trainer.")
        assert run["state"] == "finished"
        assert [row["item"][schema.EPOCH] for row in records_of(records, "history")] == [0, 1]
        results = json.loads((job_dir / schema.RESULTS_FILE).read_text())
        assert run["run_id"] == results["wandb_run_id"]
        runs.append(run["run_id"])
    assert runs[0] != runs[1]


def nan_from_the_first_student_step(monkeypatch):
    real = Objective.student

    def student(self, student_logits, teacher_logits):
        loss, terms = real(self, student_logits, teacher_logits)
        return loss * float("nan"), terms

    monkeypatch.setattr(Objective, "student", student)


def sigterm_at_the_first_student_step(monkeypatch):
    real = Objective.student

    def student(self, student_logits, teacher_logits):
        monkeypatch.setattr(Objective, "student", real)
        os.kill(os.getpid(), signal.SIGTERM)  # the job's handler asks the loop to stop
        return real(self, student_logits, teacher_logits)

    monkeypatch.setattr(Objective, "student", student)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop, error, exit_code, preempted",
    [
        (sigterm_at_the_first_student_step, Interrupted, 3, True),
        (nan_from_the_first_student_step, NonFiniteLoss, 4, False),
    ],
)
def test_a_stopped_run_is_recorded_with_its_exit_code_not_as_finished(
    tmp_path, monkeypatch, stop, error, exit_code, preempted
):
    # two iterations: a stop asked for in the first one ends the run after it
    overrides = [*TINY, "trainer.iters_per_epoch=2", "logger=wandb", "runtime.device=cpu"]
    cfg = compose_config(overrides, hydra_node=False)
    stop(monkeypatch)
    with pytest.raises(error):
        distil(cfg, JobContext(tmp_path))
    run, records = read_wandb_run(tmp_path)
    assert (run["state"], run["exit_code"]) == ("failed", exit_code)
    assert bool(records_of(records, "preempting")) == preempted
    assert not records_of(records, "artifact")


def test_log_model_false_keeps_the_student_out_of_wandb(tmp_path):
    assert compose_config(["logger.log_model=false"]).logger.log_model is False
    student = tmp_path / "student.pt"
    torch.save({"weight": torch.zeros(1)}, student)
    tracker = WandbTracker(tmp_path, {}, log_model=False)
    tracker.log_model(student, {"teacher": "digits_cnn"})
    tracker.finish()
    run, records = read_wandb_run(tmp_path)
    assert run["state"] == "finished" and not records_of(records, "artifact")


def test_the_offline_fallback_says_why_in_words(tmp_path, monkeypatch):
    for key in [key for key in os.environ if key.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings of the user
    reasons = {
        "no W&B API key is configured (run `wandb login` or set WANDB_API_KEY)": {},
        "the W&B server did not answer within logger.init_timeout=3 s": {
            "WANDB_API_KEY": "a" * 40,
            "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
        },
    }
    for number, (reason, env) in enumerate(reasons.items()):
        with monkeypatch.context() as patched:
            for key, value in env.items():
                patched.setenv(key, value)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tracker = WandbTracker(tmp_path / str(number), {}, mode="online", init_timeout=3)
            tracker.finish()
        [warning] = [str(w.message) for w in caught if "W&B" in str(w.message)]
        assert warning.startswith(f"W&B could not log online: {reason}"), warning
        assert "logging offline instead, upload later with: wandb sync" in warning
        assert read_wandb_run(tmp_path / str(number))[0]["state"] == "finished"


def test_log_model_is_on_by_default_and_checked_before_any_work():
    assert compose_config(["logger=wandb"]).logger.log_model is True
    result = run_entry(*TINY, "logger=wandb", "logger.log_model=maybe")
    assert_user_error(result, "logger.log_model='maybe' must be true or false")


def test_the_dashboard_config_names_each_built_nodes_class_not_its_import_path(tmp_path):
    terms = {
        "adversarial": {"_target_": "tadfkd.distillation.terms.AdversarialJS", "weight": 1.0},
        "tv": {"_target_": "tadfkd.distillation.terms.TotalVariation", "weight": 0.0},
    }
    config = {"method": {"generator_terms": terms}, "runtime": {"device": "auto"}}
    record = dashboard_config(config, {"runtime.device": "cpu"}, ["seed=1"], tmp_path)
    assert record["method"]["generator_terms"] == {
        "adversarial": {"weight": 1.0, "class": "AdversarialJS"},
        "tv": {"weight": 0.0, "class": "TotalVariation"},
    }
    assert record["runtime"] == {"device": "cpu"} and record["overrides"] == ["seed=1"]
