"""``python -m tadfkd.train_teacher`` checks where it writes before it trains: an output it cannot
write, a directory, or an existing file (unless ``overwrite=true``) ends in one sentence with
exit code 2, no training and no file changed.

The refusals are quick, so one fixture starts them all together (two at a time) and each test
reads its own outcome.
"""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ROOT, assert_user_error, run_entry

from tadfkd.teachers.loading import read_metadata

SHIPPED = ROOT / "Pretrained_Teachers" / "digits" / "digits_cnn.pt"
# The one folder that even root cannot write to: the kernel refuses new files in /sys.
UNWRITABLE_FOLDER = Path("/sys")
# A short job (it names no file: each case but the README's example sets output=).
QUICK = ["recipe.epochs=1", "teacher.arch=digits_cnn_s"]
# case -> (overrides, fragments of the message); {tmp} is the case's scratch folder
CASES = {
    "output under a file": (
        [*QUICK, "output=/dev/null/x.pt"],
        ["/dev/null/x.pt cannot be written"],
    ),
    "read-only folder": ([*QUICK, "output={tmp}/read-only/x.pt"], ["cannot be written"]),
    "folder no one may write to": (
        [*QUICK, f"output={UNWRITABLE_FOLDER}/x.pt"],
        ["cannot be written"],
    ),
    "output is a directory": ([*QUICK, "output={tmp}"], ["is a directory"]),
    "existing output": ([*QUICK, "output={tmp}/teacher.pt"], ["teacher.pt exists already"]),
    # The README's example as it was: the option's own file, here a copy of the shipped zoo.
    "existing zoo file": (
        ["teacher=digits_cnn", "paths.teachers={tmp}/zoo"],
        ["zoo/digits/digits_cnn.pt exists already", "overwrite=true"],
    ),
    # Another suffix or spelling of a zoo file: its metadata beside it would be replaced.
    "existing metadata, another suffix": (
        [*QUICK, "output={tmp}/zoo/digits/digits_cnn.pth"],
        ["teacher metadata", "zoo/digits/digits_cnn.json exists already"],
    ),
    "existing metadata, no suffix": (
        [*QUICK, "output={tmp}/zoo//digits/./digits_cnn"],
        ["digits_cnn.json exists already"],
    ),
    "output spelled as the metadata": (
        [*QUICK, "output={tmp}/new.json"],
        ["is where the teacher's metadata goes"],
    ),
    # Values that name the output file are checked before the path is built from them.
    "seed with a slash": (
        ["recipe.epochs=1", "paths.teachers={tmp}/zoo", "seed=a/b"],
        ["seed='a/b' must be a whole number"],
    ),
    "architecture with a slash": (
        ["recipe.epochs=1", "paths.teachers={tmp}/zoo", "teacher.arch=x/y"],
        ["teacher.arch='x/y' must be a known architecture"],
    ),
    "override with no key": (
        ["recipe.epochs=1", "output={tmp}/teacher.pt", "+=3"],
        ["the override '+=3' names no key"],
    ),
}
AS_ROOT = os.geteuid() == 0  # root writes into a read-only folder all the same


def prepare(case: str, tmp: Path) -> None:
    """What the case finds on disk before it runs."""
    if case == "read-only folder":
        (tmp / "read-only").mkdir(mode=0o555)
    elif case == "existing output":
        (tmp / "teacher.pt").write_bytes(b"an earlier teacher")
    elif case.startswith(("existing zoo file", "existing metadata")):
        zoo = tmp / "zoo" / "digits"
        zoo.mkdir(parents=True)
        shutil.copy(SHIPPED, zoo)
        shutil.copy(SHIPPED.with_suffix(".json"), zoo)


def teacher_job(tmp: Path, *overrides: str):
    return run_entry(
        *overrides,
        f"hydra.run.dir={tmp / 'run'}",
        entry="-m tadfkd.train_teacher",
        timeout=300,
    )


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and "run" not in path.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    cases = [case for case in CASES if not (case == "read-only folder" and AS_ROOT)]
    scratch = {case: tmp_path_factory.mktemp("teacher_job") for case in cases}
    before = {}
    for case in cases:
        prepare(case, scratch[case])
        before[case] = files_in(scratch[case])
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            case: pool.submit(
                teacher_job,
                scratch[case],
                *(item.format(tmp=scratch[case]) for item in CASES[case][0]),
            )
            for case in cases
        }
        return {case: (scratch[case], before[case], futures[case].result()) for case in cases}


@pytest.mark.parametrize("case", CASES)
def test_an_output_it_cannot_or_must_not_write_is_refused_before_training(case, outcomes):
    if case == "read-only folder" and AS_ROOT:
        pytest.skip("root writes into read-only folders; '/sys' stands for them")
    tmp, before, result = outcomes[case]
    assert_user_error(result, *CASES[case][1])
    assert "epoch 1/" not in result.stdout  # refused before any training
    assert files_in(tmp) == before  # nothing written, nothing replaced


@pytest.mark.slow
def test_overwrite_true_replaces_an_existing_teacher(tmp_path):
    output = tmp_path / "teacher.pt"
    output.write_bytes(b"an earlier teacher")
    result = teacher_job(tmp_path, *QUICK, f"output={output}", "overwrite=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1/1" in result.stdout and f"saved {output}" in result.stdout
    assert output.read_bytes() != b"an earlier teacher"
    metadata = read_metadata(output)
    assert metadata["arch"] == "digits_cnn_s" and 0 <= metadata["test_acc"] <= 1
