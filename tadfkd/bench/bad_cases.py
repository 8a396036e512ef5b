"""The cases of the battery of bad inputs (``bad_inputs`` runs and judges them), in groups: each
a command line of a real entry point, what it finds in its folder and how a refusal ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHERS = ROOT / "Pretrained_Teachers"
TINY = ["debug=tiny", "runtime.device=cpu", "runtime.threads=1", "logger=none"]
TEACHER_JOB = ["runtime.threads=1", "runtime.device=cpu", "recipe.epochs=1"]
REPORT_FIELDS = {  # results.json field -> a wrong value, for the report's cases
    "string accuracy": ("student_final_acc", "abc"),
    "string health value": ("history", [{"epoch": 1, "health/agreement": "high"}]),
    "dict history": ("history", {"epoch": 1}),
    "list method": ("method", ["tadfkd"]),
    "string wall time": ("wall_time_s", "long"),
    "NaN accuracy": ("student_final_acc", float("nan")),
    "infinite accuracy": ("student_final_acc", float("inf")),
    "accuracy 5.0": ("student_final_acc", 5.0),
    "accuracy -3.0": ("student_best_acc", -3.0),
}
RUN = [*TINY, "hydra.run.dir={tmp}/run"]  # the cases' command lines ({tmp}: the case's folder)
WANDB = [*TINY[:3], "logger=wandb", "hydra.run.dir={tmp}/run"]
TEACHER_RUN = [*TEACHER_JOB, "hydra.run.dir={tmp}/teacher_run", "paths.teachers={tmp}/zoo"]
SWEEP = [
    "-m",
    *TINY,
    "trainer.iters_per_epoch=1",
    "trainer.student_steps=1",
    "report=true",
    "hydra.sweep.dir={tmp}/sweep",
]


@dataclass
class Case:
    """One bad input: ``args`` of ``entry`` (``{tmp}`` is the case's folder); ``prepare(tmp)``
    lays out what it finds; ``codes`` the exit codes of a proper refusal (0: a repair, checked
    by ``check(tmp)``, which returns a problem or None)."""

    name: str
    args: list[str]
    entry: str = "run.py"
    codes: tuple[int, ...] = (2,)
    prepare: Callable[[Path], None] | None = None
    check: Callable[[Path], str | None] | None = None
    interrupt_after: str | None = None  # send SIGINT after the first line starting with this
    env: dict[str, str] = field(default_factory=dict)


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def command(entry: str, args: list[str]) -> list[str]:
    target = entry.split() if entry.startswith("-m") else [str(ROOT / entry)]
    return [sys.executable, *target, *args]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


# -- what the cases find ------------------------------------------------------------------------
class Fixtures:
    """A finished tiny run and a teacher zoo copy, made once and copied into each case."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.finished = base / "finished"
        result = subprocess.run(
            command("run.py", [*TINY, f"hydra.run.dir={self.finished}"]),
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise SystemExit(f"the finished run the battery needs failed:\n{result.stderr[-2000:]}")

    def finished_run(self, tmp: Path) -> None:
        shutil.copytree(self.finished, tmp / "run")


def zoo(tmp: Path) -> None:
    """A copy of two shipped teachers' files (the job must refuse to replace them)."""
    for name in ("digits/digits_cnn", "fashion_mnist/ceiling_digits_cnn_s"):
        for suffix in (".pt", ".json"):
            target = tmp / "zoo" / f"{name}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(TEACHERS / f"{name}{suffix}", target)
    (tmp / "zoo.before").write_text(json.dumps(sorted(snapshot(tmp / "zoo"))))


def zoo_unchanged(tmp: Path) -> str | None:
    for name in ("digits/digits_cnn", "fashion_mnist/ceiling_digits_cnn_s"):
        for suffix in (".pt", ".json"):
            if (tmp / "zoo" / f"{name}{suffix}").read_bytes() != (
                TEACHERS / f"{name}{suffix}"
            ).read_bytes():
                return f"the copy of {name}{suffix} was replaced"
    return None


def results_job(sweep: Path, name: str, **changes) -> None:
    """A finished job of a sweep, with ``changes`` to its results.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 0\nmethod: {name: tadfkd}\n")
    results = {
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
        "history": [{"epoch": 1, "health/agreement": 0.5}],
        "wall_time_s": 1.0,
        **changes,
    }
    (job / "results.json").write_text(json.dumps(results))


def report_sweep(key: str, value) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        results_job(tmp / "sweep", "0_good")
        results_job(tmp / "sweep", "1_bad", **{key: value})

    return prepare


def bad_job_unreadable(tmp: Path) -> str | None:
    report = tmp / "out" / "report.md"
    if not report.exists():
        return "no report.md"
    tables = report.read_text().split("## Failed or unreadable jobs")
    if len(tables) < 2 or "1_bad" not in tables[1]:
        return "the damaged job is not listed as unreadable"
    if any(shown in tables[0] for shown in ("inf", "nan", "500.0", "-300.0")):
        return "a nonsense number is shown"
    return None


def record_unchanged(tmp: Path) -> str | None:
    before = json.loads((tmp / "record.before").read_text())
    after = {name: data.decode(errors="replace") for name, data in snapshot(tmp / "run").items()}
    return None if after == before else "the refused run changed the run directory"


def keep_record(fixtures: Fixtures) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        fixtures.finished_run(tmp)
        files = {k: v.decode(errors="replace") for k, v in snapshot(tmp / "run").items()}
        (tmp / "record.before").write_text(json.dumps(files))

    return prepare


def damaged_results(damage: str, fixtures: Fixtures) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        fixtures.finished_run(tmp)
        (tmp / "run" / "results.json").write_text(damage)

    return prepare


def results_rebuilt(tmp: Path) -> str | None:
    try:
        results = json.loads((tmp / "run" / "results.json").read_text())
    except ValueError:
        return "results.json is still damaged"
    return None if 0 <= results["student_final_acc"] <= 1 else "results.json holds nonsense"


def cases(fixtures: Fixtures) -> list[Case]:
    """The whole battery, group by group."""
    return [
        *teacher_job_cases(),
        *refused_run_cases(fixtures),
        *sweep_end_cases(),
        *report_cases(),
        *fault_cases(fixtures),
        *nonsense_cases(),
        *hydra_message_cases(),
    ]


def teacher_job_cases() -> list[Case]:
    """Item 1 of the battery: the teacher job never replaces a file it would write."""
    return [
        Case(
            "teacher job: .pth beside a shipped .json",
            [*TEACHER_RUN, "output={tmp}/zoo/digits/digits_cnn.pth"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: the ceiling's stem",
            [*TEACHER_RUN, "output={tmp}/zoo/fashion_mnist/ceiling_digits_cnn_s.pth"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: output without suffix",
            [*TEACHER_RUN, "output={tmp}/zoo//digits/./digits_cnn"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: output named .json",
            [*TEACHER_RUN, "output={tmp}/new.json"],
            "-m tadfkd.train_teacher",
        ),
        Case(
            "teacher job: the zoo file itself",
            [
                "runtime.threads=1",
                "teacher=digits_cnn",
                "paths.teachers={tmp}/zoo",
                "hydra.run.dir={tmp}/teacher_run",
            ],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
    ]


def refused_run_cases(fixtures: Fixtures) -> list[Case]:
    """Item 2 of the battery: a refused run leaves its directory as it was."""
    return [
        Case(
            "refused: other settings",
            [*RUN, "seed=3", "optimizer.student.lr=0.5"],
            prepare=keep_record(fixtures),
            check=record_unchanged,
        ),
        Case(
            "refused: invalid value",
            [*RUN, "trainer.epochs=-1"],
            prepare=keep_record(fixtures),
            check=record_unchanged,
        ),
    ]


def sweep_end_cases() -> list[Case]:
    """Items 3 and 7 of the battery: a sweep's end, a summary and a non-zero code, whatever
    broke."""
    return [
        Case(
            "sweep: a failed job beside a wrongly typed result",
            [*SWEEP, "trainer.epochs=1,0"],
            codes=(5,),
            prepare=lambda tmp: results_job(tmp / "sweep", "9_planted", student_final_acc="abc"),
        ),
        Case(
            "sweep: a job left unfinished",
            [*SWEEP, "trainer.epochs=1"],
            codes=(6,),
            prepare=lambda tmp: (tmp / "sweep" / "9_held" / ".hydra").mkdir(parents=True),
        ),
    ]


def report_cases() -> list[Case]:
    """Item 4 of the battery: the report."""
    return [
        *[
            Case(
                f"report: {name}",
                ["{tmp}/sweep", "--out", "{tmp}/out"],
                "-m tadfkd.report",
                codes=(0,),
                prepare=report_sweep(*change),
                check=bad_job_unreadable,
            )
            for name, change in REPORT_FIELDS.items()
        ],
        Case(
            "report: teacher name with a newline and |",
            ["{tmp}/sweep", "--out", "{tmp}/out"],
            "-m tadfkd.report",
            codes=(0,),
            prepare=report_sweep("teacher", "evil\n| x |"),
            check=lambda tmp: (
                None
                if "evil \\| x \\|" in (tmp / "out" / "report.md").read_text()
                else "the name is not escaped"
            ),
        ),
        Case(
            "report: --out on a read-only filesystem",
            ["{tmp}/sweep", "--out", "/proc/report"],
            "-m tadfkd.report",
            prepare=report_sweep("seed", 0),
        ),
        Case(
            "report: --ceiling that does not exist",
            ["{tmp}/sweep", "--out", "{tmp}/out", "--ceiling", "/nonexistent.json"],
            "-m tadfkd.report",
            prepare=report_sweep("seed", 0),
        ),
    ]


def fault_cases(fixtures: Fixtures) -> list[Case]:
    """Item 5 of the battery: ordinary faults and mistakes."""
    return [
        Case("unset ${oc.env:...} in an override", [*RUN, "seed=${oc.env:TADFKD_UNSET_VARIABLE}"]),
        Case(
            "unset ${oc.env:...}, teacher job",
            [*TEACHER_RUN, "seed=${oc.env:TADFKD_UNSET_VARIABLE}"],
            "-m tadfkd.train_teacher",
        ),
        Case("teacher job: seed=a/b", [*TEACHER_RUN, "seed=a/b"], "-m tadfkd.train_teacher"),
        Case(
            "teacher job: teacher.arch=x/y",
            [*TEACHER_RUN, "teacher.arch=x/y"],
            "-m tadfkd.train_teacher",
        ),
        Case(
            "teacher job: recipe.lr=inf",
            [*TEACHER_RUN, "recipe.lr=inf", "output={tmp}/t.pt"],
            "-m tadfkd.train_teacher",
        ),
        Case(
            "truncated results.json of a finished run",
            RUN,
            codes=(0,),
            prepare=damaged_results('{"student_final_acc": 0.9', fixtures),
            check=results_rebuilt,
        ),
        Case(
            "wrongly typed results.json of a finished run",
            RUN,
            codes=(0,),
            prepare=damaged_results('{"student_final_acc": "abc"}', fixtures),
            check=results_rebuilt,
        ),
        Case(
            "Ctrl-C during training",
            [*RUN, "trainer.epochs=8", "trainer.iters_per_epoch=6"],
            codes=(130,),
            interrupt_after="epoch 1/",
            check=lambda tmp: None if (tmp / "run" / "checkpoint.pt").exists() else "no checkpoint",
        ),
    ]


def nonsense_cases() -> list[Case]:
    """Item 6 of the battery: nonsense values."""
    return [
        Case("teacher of another dataset", [*RUN, "teacher=fmnist_cnn"]),
        Case("negative loss weight", [*RUN, "method.generator_terms.bn.weight=-100"]),
        Case("infinite student learning rate", [*RUN, "optimizer.student.lr=inf"]),
        Case("NaN generator learning rate", [*RUN, "optimizer.generator.lr=nan"]),
        Case("infinite temperature", [*RUN, "method.generator_terms.adversarial.temperature=inf"]),
        Case("unknown loss term class", [*RUN, "method.generator_terms.bn._target_=x.BNStats"]),
        Case("zero teacher std", [*RUN, "teacher.std=[0]"]),
        Case("teacher mean not a number", [*RUN, "teacher.mean=[abc]"]),
        Case("empty teacher checkpoint", [*RUN, "teacher.checkpoint="]),
        Case("teacher name with a newline", [*RUN, "teacher.name='a\nb|c'"]),
        Case("unknown student architecture", [*RUN, "student.arch=nope"]),
        Case("negative W&B timeout", [*WANDB, "logger.init_timeout=-5"]),
        Case("empty W&B project", [*WANDB, "logger.project="]),
        Case("W&B group with a slash", [*WANDB, "logger.group=a/b"]),
        Case("secret_env not a list", [*RUN, "runtime.secret_env=abc"]),
        Case("override with no key", [*RUN, "=3"]),
    ]


def hydra_message_cases() -> list[Case]:
    """Mistakes Hydra itself explains (exit 1, no traceback)."""
    return [
        Case("unknown option", [*RUN, "trainer.nonsense=1"], codes=(1,)),
        Case("unquoted non-ASCII run directory", [*TINY, "hydra.run.dir={tmp}/é"], codes=(1,)),
    ]
