"""``python run.py`` as a command: its own --help page (what it does, every group of the job
with its options, the launchers, example commands that work), tab completion, each job's
lines in its own run.log with either launcher, and the check of overrides with no key."""

import re

import pytest
from helpers import CONF, compose_config, environment, options, run_entry

from tadfkd.base.errors import UserError
from tadfkd.run.context import refuse_keyless_overrides

# one epoch of one iteration of one student step at batch 8
TINY = ["debug=tiny", "trainer.iters_per_epoch=1", "trainer.student_steps=1"]
TINY += ["trainer.batch_size=8", "runtime.eval_batch_size=256"]
# groups whose options the page names by pattern, and groups of where and how a job runs
BY_PATTERN = {"teacher"}
WITHOUT_OPTIONS = {"runtime", "paths"}


@pytest.fixture(scope="module")
def help_page() -> str:
    result = run_entry("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def group_lines(page: str) -> dict[str, str]:
    """Each group's entry under "Config groups" (its line and continuation lines)."""
    section = page.split("Config groups", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    for line in section.splitlines()[1:]:
        if re.match(r"  \S", line):
            group, text = line.split(maxsplit=1)
            entries[group] = text
        elif line.startswith("    ") and entries:
            entries[group] += " " + line.strip()
    return entries


def test_help_describes_every_group_of_the_job_and_not_the_teacher_recipes(help_page):
    job_groups = {
        group for group in compose_config().hydra.runtime.choices if not group.startswith("hydra")
    }
    entries = group_lines(help_page)
    assert set(entries) == job_groups
    # the teacher job's group (python -m tadfkd.train_teacher) is not one of run.py's
    assert "recipe" not in entries and "recipe=" not in help_page
    for group, text in entries.items():
        named = set(re.findall(r"[a-z][a-z0-9_]*\*?", text.split(":", 1)[-1]))
        if group in BY_PATTERN:
            patterns = [name[:-1] for name in named if name.endswith("*")]
            assert all(any(o.startswith(p) for p in patterns) for o in options(group)), text
        elif group not in WITHOUT_OPTIONS:
            assert set(options(group)) <= named, (group, set(options(group)) - named)


def test_help_names_the_launchers_and_five_examples_that_compose(help_page):
    for launcher in ("local", "slurm"):
        assert f"hydra/launcher={launcher}" in help_page
        assert (CONF / "hydra" / "launcher" / f"{launcher}.yaml").exists()
    assert "wandb sweep sweeps/" in help_page
    examples = re.findall(r"^ +python run\.py(.*?)(?: +#.*)?$", help_page, flags=re.MULTILINE)
    assert len(examples) == 5
    for example in examples:
        overrides = [word for word in example.split() if word != "-m"]
        compose_config(overrides)  # raises on an unknown group, option or key
    assert len(help_page.splitlines()) < 60, "a short page"


def test_tab_completion_completes_run_py_groups_options_and_keys():
    def complete(line: str) -> list[str]:
        result = run_entry("-sc", "query=bash", env=environment(COMP_LINE=line))
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split()

    assert complete("python run.py method=dafl") == [
        "method=dafl",
        "method=dafl_cifar10",
        "method=dafl_cifar100",
    ]
    assert "trainer.epochs=" in complete("python run.py trainer.ep")
    assert "bash" in run_entry("-sc", "install=bash").stdout  # the script to eval


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_each_job_of_a_multirun_writes_its_own_lines_to_its_run_log(tmp_path, launcher):
    chosen = [] if launcher == "basic" else ["hydra/launcher=local"]
    sweep_dir = tmp_path / "sweep"
    result = run_entry("-m", *chosen, *TINY, "seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted(sweep_dir.glob("*/run.log"))
    assert len(logs) == 2
    for log in logs:
        lines = log.read_text().splitlines()
        assert any("teacher digits_cnn (digits_cnn): test accuracy" in line for line in lines)
        [epoch] = [line for line in lines if "] epoch 1/1: student test accuracy" in line]
        [done] = [line for line in lines if "] done: student final test accuracy" in line]
        assert str(log.parent / "results.json") in done  # this job's lines, no other's
        assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] ", epoch)  # time-stamped
    if launcher == "basic":  # the console shows the same lines, without time stamps
        assert result.stdout.count("epoch 1/1: student test accuracy") == 2
        assert "\nepoch 1/1: " in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        ["seed=0,1,2", "hydra/launcher=basic", "~speed.scoring", "++trainer.epochs=2"],
        ["-m", "--cfg", "job", "teacher.name='=3'", "paths.data=/tmp/a=b"],
        ["-cd", "=conf", "-cn", "config", "seed=range(3)"],  # an option's value, not an override
    ],
)
def test_overrides_with_keys_and_options_pass_the_keyless_check(arguments):
    refuse_keyless_overrides(arguments)


@pytest.mark.parametrize("override", ["=3", "+=3", "++=3", "~=", "=3,4"])
def test_an_override_with_no_key_is_refused_in_one_sentence(override):
    with pytest.raises(UserError, match="names no key; write KEY=VALUE"):
        refuse_keyless_overrides(["seed=1", override])
