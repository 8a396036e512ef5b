"""A sweep's wall time summed over its launches (tadfkd/analysis/launches.py): a finished launch
counts from its start to its end, a stopped one to the last file its jobs wrote."""

import json
import os

import pytest

from tadfkd.analysis.launches import LAUNCHES_FILE, record_launch, sweep_wall_time
from tadfkd.analysis.markdown import launches_sentence


def write_launches(sweep_dir, launches):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / LAUNCHES_FILE).write_text(json.dumps({"launches": launches}))


def touch(path, when):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    os.utime(path, (when, when))


def test_a_stopped_launch_counts_to_the_last_file_it_wrote_and_a_finished_one_to_its_end(
    tmp_path,
):
    sweep = tmp_path / "sweep"
    write_launches(
        sweep,
        [
            {"started": 1000.0, "ended": None, "cpu": "AMD EPYC"},
            {"started": 5000.0, "ended": 5600.0, "cpu": "AMD EPYC"},
        ],
    )
    touch(sweep / "0_job" / "checkpoint.pt", 1900.0)  # the first launch's last file
    touch(sweep / "0_job" / "results.json", 5500.0)  # written by the second launch
    assert sweep_wall_time(sweep) == (900.0 + 600.0, 2, 1, ["AMD EPYC"])


def test_no_launches_file_means_no_wall_time_and_a_damaged_one_too(tmp_path):
    assert sweep_wall_time(tmp_path) is None
    (tmp_path / LAUNCHES_FILE).write_text("{not json")
    assert sweep_wall_time(tmp_path) is None


def test_record_launch_appends_a_start_and_closes_the_last_launch(tmp_path):
    sweep = tmp_path / "new_sweep"  # made by the first record
    record_launch(sweep, "started", "CPU A")
    record_launch(sweep, "ended")
    record_launch(sweep, "started", "CPU A")
    launches = json.loads((sweep / LAUNCHES_FILE).read_text())["launches"]
    assert [launch["ended"] is None for launch in launches] == [False, True]
    assert launches[0]["ended"] >= launches[0]["started"]
    seconds, count, stopped, cpus = sweep_wall_time(sweep)
    assert (count, stopped, cpus) == (2, 1, ["CPU A"]) and seconds >= 0


@pytest.mark.parametrize(
    ("seconds", "count", "stopped", "words"),
    [
        (9000.0, 1, 0, "Sweep wall time: 2 h 30 min (9000 s), summed over 1 launch; CPU: X."),
        (3720.0, 3, 2, "1 h 02 min (3720 s), summed over 3 launches (2 of them stopped before"),
    ],
)
def test_the_report_sentence_says_hours_launches_and_the_cpu(seconds, count, stopped, words):
    assert words in launches_sentence(seconds, count, stopped, ["X"])
