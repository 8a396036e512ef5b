"""The sweep report on hand-made run directories: numbers, partial sweeps, failed jobs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_entry
from omegaconf import OmegaConf
from scipy import stats

from tadfkd.analysis import jobs, markdown, report, statistics
from tadfkd.base.errors import UserError
from tadfkd.report import main as report_main

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
        "dataset": {"name": "digits", "num_classes": 10},
        "trainer": {"iters_per_epoch": 36, "student_steps": 10, "batch_size": 128},
    }
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if accs is not None:
        history = [
            {
                "epoch": i + 1,
                "acc/student": acc,
                "health/agreement": acc,
                "selection/rate": 0.5,
                "time/epoch_s": 2.0,
            }
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
    runs = jobs.read_sweep_directory(sweep)
    assert [run.name for run in runs] == ["0_a", "1_b", "2_c", "3_d", "10_e"]
    assert [run.status for run in runs] == ["done", "done", "done", "failed", "running"]
    rows = report.write_report(runs, str(sweep), tmp_path / "out")
    by_key = {(row["method"], row["accuracy"]): row for row in rows}
    final = by_key["tadfkd", "final"]
    finals = np.array([0.9, 0.4])
    assert final["mean"] == pytest.approx(0.65) and final["n"] == 2
    assert final["std"] == pytest.approx(finals.std(ddof=1))  # the sample std
    half = stats.t.ppf(0.975, 1) * finals.std(ddof=1) / np.sqrt(2)
    assert final["ci95_low"] == pytest.approx(0.65 - half)
    assert final["ci95_high"] == pytest.approx(0.65 + half)
    assert final["worst"] == pytest.approx(0.4) and final["collapse_rate"] == pytest.approx(0.5)
    assert final["worst_teacher"] == "hard" and final["worst_teacher_mean"] == pytest.approx(0.4)
    assert by_key["tadfkd", "best"]["mean"] == pytest.approx(0.75)
    assert by_key["tadfkd", "last10"]["mean"] == pytest.approx((0.7 + 0.5) / 2)
    basic = by_key["basic", "final"]
    assert (basic["jobs"], basic["n"], basic["failed"], basic["running"]) == (3, 1, 1, 1)
    assert basic["mean"] == pytest.approx(0.2) and basic["collapse_rate"] == 1.0
    assert basic["std"] is None and basic["ci95_low"] is None  # one job: no spread


def test_paired_differences_compare_methods_on_the_same_teacher_and_seed(tmp_path):
    root = tmp_path / "sweep"
    for teacher, seed, a, b in (
        ("good", 0, 0.9, 0.8),
        ("good", 1, 0.7, 0.75),
        ("hard", 0, 0.6, 0.3),
    ):
        make_job(root, f"a_{teacher}{seed}", "tadfkd", teacher, seed, [a])
        make_job(root, f"b_{teacher}{seed}", "dfq", teacher, seed, [b])
    make_job(root, "b_unpaired", "dfq", "hard", 5, [0.1])  # no tadfkd job on seed 5
    (pair,) = statistics.paired_differences(jobs.read_sweep_directory(root))
    differences = np.array([0.1, -0.05, 0.3])
    assert (pair["first"], pair["second"], pair["pairs"]) == ("tadfkd", "dfq", 3)
    assert pair["mean_difference"] == pytest.approx(differences.mean())
    assert pair["std"] == pytest.approx(differences.std(ddof=1))
    assert pair["first_better"] == pytest.approx(2 / 3)


def test_files_say_what_was_run_partial_and_list_failed_and_running_jobs(sweep, tmp_path):
    out = tmp_path / "out"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Partial sweep" in text and "3_d" in text and "CUDA out of memory" in text
    assert "10_e (basic, good, seed 1)" in text
    assert "What was run: dataset digits; student digits_cnn_s; 2 epochs" in text
    assert "*last10*: mean of last 2 epochs" in text  # the label says what it is
    assert "| tadfkd | final | 2 / 2 | 65.0 ± 35.4 |" in text
    assert "| tadfkd - basic | 1 |" in text
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["mean"]) == pytest.approx(0.65)  # fractions in the csv
    with (out / "runs.csv").open() as handle:
        by_job = {row["job"]: row for row in csv.DictReader(handle)}
    assert by_job["3_d"]["status"] == "failed" and by_job["0_a"]["health/agreement"] == "0.9"
    assert by_job["0_a"]["wall_time_s"] == "1.0"
    # a job's time is the sum of its epochs' times (every launch of a resumed run), not the
    # wall time of its last launch
    epochs = len(json.loads((sweep / "0_a" / "results.json").read_text())["history"])
    assert by_job["0_a"]["epochs_time_s"] == str(2.0 * epochs)
    assert "the sum of its epochs' times, resumed runs included" in text
    assert "wall time of each job's last launch 1-1 s" in text
    for plot in ("curves.png", "health.png"):
        assert (out / plot).stat().st_size > 1000


def test_collapse_threshold_is_configurable(sweep, tmp_path):
    rows = report.write_report(jobs.read_sweep_directory(sweep), "s", tmp_path, 0.3)
    final = next(row for row in rows if row["method"] == "tadfkd" and row["accuracy"] == "final")
    assert final["collapse_rate"] == 0.0
    with pytest.raises(UserError, match="collapse-below"):
        report.write_report([], "s", tmp_path, 1.5)


def test_runs_without_a_test_set_are_reported_as_not_measured(tmp_path):
    root = tmp_path / "sweep"
    job = make_job(root, "0_a", "tadfkd", "good", 0, [0.5])
    results = json.loads((job / "results.json").read_text())
    for key in ("student_final_acc", "student_best_acc", "student_last10_acc", "teacher_acc"):
        results[key] = None
    results["epoch_accs"] = [None]
    (job / "results.json").write_text(json.dumps(results))
    make_job(root, "1_b", "tadfkd", "hard", 0, [0.7])
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    final = next(r for r in csv.DictReader((out / "report.csv").open()) if r["accuracy"] == "final")
    assert final["n"] == "1" and float(final["mean"]) == pytest.approx(0.7)


def test_job_configs_are_never_resolved_so_no_secret_reaches_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("REPORT_TEST_SECRET", "hunter2-secret")
    root = tmp_path / "sweep"
    job = make_job(root, "0_a", "tadfkd", "good", 0, [0.5])
    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    config.logger = {"api_key": "${oc.env:REPORT_TEST_SECRET}"}
    config.teacher.name = "${oc.env:REPORT_TEST_SECRET}"
    OmegaConf.save(config, job / ".hydra" / "config.yaml")
    (job / "results.json").unlink()  # a running job: its labels come from the config
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    for path in out.iterdir():
        if path.suffix in (".md", ".csv"):
            assert "hunter2" not in path.read_text(), path.name


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ("{not json", "results.json"),
        ('{"method": "tadfkd"}', "results.json"),  # fields missing
        ("[1, 2", "failed.json"),
        ("seed: [unclosed", ".hydra/config.yaml"),
    ],
)
def test_a_malformed_job_file_lists_the_job_as_unreadable(tmp_path, damage, file):
    root = tmp_path / "sweep"
    make_job(root, "0_good", "tadfkd", "good", 0, [0.5, 0.6])
    bad = make_job(root, "1_bad", "tadfkd", "hard", 0, [0.4], fail="x")
    (bad / "results.json").unlink()
    (bad / file).write_text(damage)
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    runs = {run.name: run for run in jobs.read_sweep_directory(root)}
    assert runs["1_bad"].status == "unreadable" and "unreadable" in runs["1_bad"].error
    assert "1_bad" in (out / "report.md").read_text()
    assert runs["0_good"].status == "done"


def test_missing_sources_and_unreachable_wandb_are_one_sentence(tmp_path, monkeypatch, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "holds no run directories" in capsys.readouterr().err
    assert report_main([str(tmp_path / "no_such_sweep")]) == 2
    assert "is not a directory" in capsys.readouterr().err  # not taken for a W&B group
    wandb = pytest.importorskip("wandb")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", offline)
    assert report_main(["me/tadfkd/sweep_digits_2026", "--out", str(tmp_path / "w")]) == 2
    assert "could not read W&B group 'me/tadfkd/sweep_digits_2026'" in capsys.readouterr().err


def test_a_wandb_group_name_never_writes_outside_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "read_wandb_group", lambda source: [])
    _, out = jobs.read_source("me/project/..")
    assert out.resolve().is_relative_to((tmp_path / "reports").resolve()) and out.name != ".."
    with pytest.raises(UserError, match="not a directory"):
        jobs.read_source("../x")


def test_curves_draw_chance_teacher_and_the_ceiling(sweep, tmp_path):
    ceiling = tmp_path / "ceiling.json"
    ceiling.write_text(json.dumps({"test_acc": 0.856, "arch": "digits_cnn_s"}))
    runs = jobs.read_sweep_directory(sweep)
    report.write_report(runs, str(sweep), tmp_path / "out", ceiling_file=ceiling)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Supervised ceiling: the student architecture (digits_cnn_s)" in text and "85.6%" in text


def test_the_entry_point_reads_bad_input_as_one_sentence_and_loses_nothing(tmp_path):
    # Through `python -m tadfkd.report`, as a user runs it: a missing source and a null-accuracy
    # run (no test set) next to a malformed one; the jobs' files are left as they were.
    missing = run_entry(str(tmp_path / "no_such_sweep"), entry="-m tadfkd.report", timeout=300)
    assert missing.returncode == 2, missing.stderr[-2000:]
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'no_such_sweep'} is not"), (
        missing.stderr[-2000:]
    )
    root = tmp_path / "sweep"
    job = make_job(root, "0_a", "tadfkd", "good", 0, [0.5])
    results = json.loads((job / "results.json").read_text())
    results.update(student_final_acc=None, student_best_acc=None, student_last10_acc=None)
    results.update(teacher_acc=None, epoch_accs=[None])
    (job / "results.json").write_text(json.dumps(results))
    bad = make_job(root, "1_b", "tadfkd", "hard", 0, [0.7])
    (bad / "results.json").write_text("{not json")
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    out = tmp_path / "out"
    result = run_entry(str(root), "--out", str(out), entry="-m tadfkd.report", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "1_b" in (out / "report.md").read_text()
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before


def test_the_commit_line_says_which_jobs_recorded_none():
    assert markdown.commits_text(["0123456789abcdef"], 0) == "0123456789ab"
    assert markdown.commits_text(["0123456789abcdef", "fedcba9876543210"], 0) == (
        "0123456789ab, fedcba987654"
    )
    assert markdown.commits_text(["0123456789abcdef"], 8) == (
        "0123456789ab (not recorded by 8 jobs: older code)"
    )
    assert markdown.commits_text([], 3) == "not recorded"


# Fields of results.json a report reads, each wrongly typed or out of range (issue 24).
BAD_FIELDS = {
    "string accuracy": ("student_final_acc", "abc"),
    "NaN accuracy": ("student_final_acc", float("nan")),
    "infinite accuracy": ("student_best_acc", float("inf")),
    "accuracy above 1": ("student_final_acc", 5.0),
    "negative accuracy": ("student_last10_acc", -3.0),
    "string teacher accuracy": ("teacher_acc", "high"),
    "epoch accuracies not a list": ("epoch_accs", {"1": 0.5}),
    "history a dict": ("history", {"epoch": 1}),
    "string health value": ("history", [{"epoch": 1, "health/agreement": "0.5"}]),
    "list method": ("method", ["tadfkd"]),
    "string seed": ("seed", "0"),
    "string wall time": ("wall_time_s", "long"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_a_wrongly_typed_or_out_of_range_field_makes_the_job_unreadable(tmp_path, case):
    key, value = BAD_FIELDS[case]
    root = tmp_path / "sweep"
    make_job(root, "0_good", "tadfkd", "good", 0, [0.5, 0.6])
    bad = make_job(root, "1_bad", "tadfkd", "hard", 0, [0.4])
    results = json.loads((bad / "results.json").read_text())
    results[key] = value
    (bad / "results.json").write_text(json.dumps(results))  # NaN and Infinity as Python writes
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    runs = {run.name: run for run in jobs.read_sweep_directory(root)}
    assert runs["1_bad"].status == "unreadable", runs["1_bad"]
    assert key in runs["1_bad"].error
    numbers = (out / "report.md").read_text().split("## Failed or unreadable jobs")[0]
    assert not any(shown in numbers for shown in ("inf", "nan", "500.0", "-300.0")), numbers
    rows = {row["job"]: row for row in csv.DictReader((out / "runs.csv").open())}
    assert rows["1_bad"]["status"] == "unreadable" and rows["1_bad"]["student_final_acc"] == ""
    [final] = [row for row in statistics.method_summary(list(runs.values()), 0.5)][:1]
    assert final["n"] == 1  # the good job only: NaN is never a measured job


def test_names_are_escaped_in_markdown_tables(tmp_path):
    root = tmp_path / "sweep"
    make_job(root, "0_a", "tadfkd", "good", 0, [0.5, 0.6])
    job = make_job(root, "1_b", "tadfkd", "hard", 0, [0.4, 0.5])
    results = json.loads((job / "results.json").read_text())
    results["teacher"] = "evil\n| teacher |"
    (job / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| evil \\| teacher \\| |" in text
    for line in text.splitlines():
        if line.startswith("| teacher |"):
            width = line.count(" | ")
        elif line.startswith("| evil"):
            assert line.replace("\\|", "").count(" | ") == width


def test_an_unwritable_out_and_a_missing_ceiling_are_one_sentence(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "--out", "/proc/report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the report cannot be written into /proc")
    missing = tmp_path / "nonexistent.json"
    assert report_main([str(sweep), "--out", str(tmp_path / "o"), "--ceiling", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ceiling {missing} is not a file" in err[0]


class FakeWandbRun:
    """What the W&B public API gives for one run of a group (the fields the report reads)."""

    def __init__(self, name, state, summary, rows=()):
        self.name, self.state, self.summary, self.rows = name, state, summary, list(rows)
        self.config = {"seed": 0, "method": {"name": "tadfkd"}, "teacher": {"name": "good"}}

    def scan_history(self, keys):
        return [{key: row[key] for key in keys if key in row} for row in self.rows]


def test_a_wandb_group_is_read_as_jobs_with_their_history(monkeypatch):
    wandb = pytest.importorskip("wandb")
    rows = [
        {"acc/student": 0.5, "health/agreement": 0.7, "selection/rate": 0.4, "loss/student": 2.0},
        {"acc/student": 0.6, "health/agreement": 0.8, "selection/rate": 0.5, "loss/student": 1.0},
    ]
    summary = {
        "student_final_acc": 0.6,
        "student_best_acc": 0.6,
        "student_last10_acc": 0.55,
        "teacher_acc": 0.98,
        "dataset": "digits",
        "teacher": "good",
        "student": "digits_cnn_s",
        "method": "tadfkd",
        "seed": 0,
    }
    group = [
        FakeWandbRun("done", "finished", summary, rows),
        FakeWandbRun("live", "running", {}),
        FakeWandbRun("crashed", "crashed", {}),
        FakeWandbRun("odd", "finished", {**summary, "student_best_acc": 7.0}, rows),
    ]
    seen = {}

    class Api:
        def __init__(self, timeout):
            pass

        def runs(self, path, filters):
            seen.update(path=path, filters=filters)
            return group

    monkeypatch.setattr(wandb, "Api", Api)
    runs, out = jobs.read_source("me/tadfkd/sweep_digits")
    assert seen == {"path": "me/tadfkd", "filters": {"group": "sweep_digits"}}
    assert out == Path("reports") / "sweep_digits"
    assert [run.status for run in runs] == ["done", "running", "failed", "unreadable"]
    done = runs[0]
    assert (done.method, done.teacher, done.student, done.seed) == (
        "tadfkd",
        "good",
        "digits_cnn_s",
        0,
    )
    assert done.results["epoch_accs"] == [0.5, 0.6]
    assert done.final_health == {"health/agreement": 0.8, "selection/rate": 0.5}
    assert runs[1].teacher == "good" and runs[2].error == "W&B state crashed"
    assert "student_best_acc" in runs[3].error
