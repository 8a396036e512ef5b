"""The report's finding: the sentences at its top say which method is most robust, which paired
differences exclude zero, the gaps to the ceiling and references, and the teacher's effect."""

import pytest

from tadfkd.analysis import finding, statistics
from tadfkd.analysis.jobs import Run
from tadfkd.base.errors import UserError
from tadfkd.report import main as report_main

TEACHER_ACC = {"good": 0.90, "hard": 0.80}


def job(method: str, teacher: str, seed: int, final: float) -> Run:
    results = {
        "student_final_acc": final,
        "student_best_acc": final,
        "student_last10_acc": final,
        "teacher_acc": TEACHER_ACC[teacher],
    }
    return Run(f"{method}_{teacher}_{seed}", "done", method, teacher, seed=seed, results=results)


def sweep(finals: dict[str, dict[str, list[float]]]) -> list[Run]:
    return [
        job(method, teacher, seed, final)
        for method, by_teacher in finals.items()
        for teacher, values in by_teacher.items()
        for seed, final in enumerate(values)
    ]


def section(runs, ceiling=None, references=()):
    summary = statistics.method_summary(runs, 0.5)
    pairs = statistics.paired_differences(runs)
    return "\n".join(finding.finding_lines(runs, summary, pairs, ceiling, references))


def test_one_method_first_on_mean_worst_teacher_and_collapse_is_named_most_robust():
    runs = sweep(
        {
            "tadfkd": {"good": [0.70, 0.72, 0.71], "hard": [0.60, 0.62, 0.61]},
            "dafl": {"good": [0.50, 0.52, 0.51], "hard": [0.20, 0.22, 0.21]},  # hard: collapsed
        }
    )
    text = section(runs)
    assert "**Most robust across teachers: tadfkd**, first on all three measures" in text
    assert "(tadfkd 66.0%, dafl 36.0%)" in text
    assert "best: tadfkd, 61.0% on hard" in text
    assert "lowest: tadfkd; tadfkd 0.0%, dafl 50.0%" in text
    # every pair gains 20 or 40 points: the interval excludes zero
    assert "the 95% interval excludes zero for tadfkd - dafl +30.0 (" in text
    assert "crosses zero" not in text
    assert "tadfkd by 10.0 points (hard 61.0% to good 71.0%)" in text
    assert "dafl by 30.0 points (hard 21.0% to good 51.0%)" in text


def test_a_split_lead_and_an_unclear_difference_are_said_as_such():
    runs = sweep(
        {
            "tadfkd": {"good": [0.80, 0.60], "hard": [0.30, 0.32]},  # best mean, worst teacher low
            "basic": {"good": [0.50, 0.70], "hard": [0.39, 0.41]},
        }
    )
    text = section(runs)
    assert "**No method leads on all three measures of robustness**" in text
    assert "(tadfkd 50.5%, basic 50.0%)" in text
    assert "best: basic, 40.0% on hard" in text
    assert "it crosses zero for tadfkd - basic +0.5 (" in text
    assert "excludes zero" not in text


def test_the_best_mean_is_placed_against_the_ceiling_and_each_reference():
    runs = sweep({"tadfkd": {"good": [0.70, 0.72]}, "basic": {"good": [0.60, 0.62]}})
    ceiling = {"test_acc": 0.869}
    references = [finding.parse_reference("ZSKD (Nayak et al. 2019)=0.7962")]
    text = section(runs, ceiling, references)
    assert (
        "The best mean (tadfkd, 71.0%) is 15.9 points below the student's supervised ceiling "
        "(86.9%), and 8.6 points below ZSKD (Nayak et al. 2019) (79.6%)." in text
    )
    # one teacher: the teacher's effect is not measured, and no sentence claims it
    assert "The teacher moves" not in text
    assert section([]) == ""


@pytest.mark.parametrize("text", ["ZSKD", "=0.8", "ZSKD=79.62", "ZSKD=high", "ZSKD=-0.1"])
def test_a_malformed_reference_is_one_sentence(text):
    with pytest.raises(UserError, match="is not NAME=FRACTION"):
        finding.parse_reference(text)


def test_the_entry_point_refuses_a_malformed_reference_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    assert report_main([str(tmp_path), "--out", str(out), "--reference", "ZSKD=79.62"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --reference 'ZSKD=79.62' is not NAME=FRACTION")
    assert error.count("\n") == 0 and not out.exists()
