"""The battery of bad inputs and faults of reliability round three (issue 24), each run as a user
runs it: ``python -m tadfkd.bench.bad_inputs [--keep]``.

Every case is a subprocess of a real entry point (``run.py``, ``-m tadfkd.train_teacher``,
``-m tadfkd.report``, ``run.py -m``) in a temporary folder (tiny runs at one thread; nothing is
written into the repository), and ends in one of:

- one-sentence error: the exit code the case expects (2 for a user's mistake; 5, 6 or 7 for an
  incomplete sweep; 130 for Ctrl-C), the last line of stderr one ``error: ...`` (or
  ``stopped: ...``) sentence, no traceback;
- handled: a fault the program repairs or reports inside its output (exit 0, checked);
- Hydra's own message: exit 1 and Hydra's explanation, no traceback (an unknown option, the
  override grammar);
- traceback: a Python traceback on the way out;
- silently accepted: exit 0 where a refusal was due, or a refused run that changed files.

The last line prints the counts; the battery passes with 0 tracebacks and 0 silently accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
    run = [*TINY, "hydra.run.dir={tmp}/run"]
    wandb = [*TINY[:3], "logger=wandb", "hydra.run.dir={tmp}/run"]
    teacher_job = [*TEACHER_JOB, "hydra.run.dir={tmp}/teacher_run", "paths.teachers={tmp}/zoo"]
    sweep = [
        "-m",
        *TINY,
        "trainer.iters_per_epoch=1",
        "trainer.student_steps=1",
        "report=true",
        "hydra.sweep.dir={tmp}/sweep",
    ]
    battery = [
        # 1. the teacher job never replaces a file it would write
        Case(
            "teacher job: .pth beside a shipped .json",
            [*teacher_job, "output={tmp}/zoo/digits/digits_cnn.pth"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: the ceiling's stem",
            [*teacher_job, "output={tmp}/zoo/fashion_mnist/ceiling_digits_cnn_s.pth"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: output without suffix",
            [*teacher_job, "output={tmp}/zoo//digits/./digits_cnn"],
            "-m tadfkd.train_teacher",
            prepare=zoo,
            check=zoo_unchanged,
        ),
        Case(
            "teacher job: output named .json",
            [*teacher_job, "output={tmp}/new.json"],
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
        # 2. a refused run leaves its directory as it was
        Case(
            "refused: other settings",
            [*run, "seed=3", "optimizer.student.lr=0.5"],
            prepare=keep_record(fixtures),
            check=record_unchanged,
        ),
        Case(
            "refused: invalid value",
            [*run, "trainer.epochs=-1"],
            prepare=keep_record(fixtures),
            check=record_unchanged,
        ),
        # 3, 7. a sweep's end: summary and a non-zero code, whatever broke
        Case(
            "sweep: a failed job beside a wrongly typed result",
            [*sweep, "trainer.epochs=1,0"],
            codes=(5,),
            prepare=lambda tmp: results_job(tmp / "sweep", "9_planted", student_final_acc="abc"),
        ),
        Case(
            "sweep: a job left unfinished",
            [*sweep, "trainer.epochs=1"],
            codes=(6,),
            prepare=lambda tmp: (tmp / "sweep" / "9_held" / ".hydra").mkdir(parents=True),
        ),
        # 4. the report
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
        # 5. ordinary faults and mistakes
        Case("unset ${oc.env:...} in an override", [*run, "seed=${oc.env:TADFKD_UNSET_VARIABLE}"]),
        Case(
            "unset ${oc.env:...}, teacher job",
            [*teacher_job, "seed=${oc.env:TADFKD_UNSET_VARIABLE}"],
            "-m tadfkd.train_teacher",
        ),
        Case("teacher job: seed=a/b", [*teacher_job, "seed=a/b"], "-m tadfkd.train_teacher"),
        Case(
            "teacher job: teacher.arch=x/y",
            [*teacher_job, "teacher.arch=x/y"],
            "-m tadfkd.train_teacher",
        ),
        Case(
            "teacher job: recipe.lr=inf",
            [*teacher_job, "recipe.lr=inf", "output={tmp}/t.pt"],
            "-m tadfkd.train_teacher",
        ),
        Case(
            "truncated results.json of a finished run",
            run,
            codes=(0,),
            prepare=damaged_results('{"student_final_acc": 0.9', fixtures),
            check=results_rebuilt,
        ),
        Case(
            "wrongly typed results.json of a finished run",
            run,
            codes=(0,),
            prepare=damaged_results('{"student_final_acc": "abc"}', fixtures),
            check=results_rebuilt,
        ),
        Case(
            "Ctrl-C during training",
            [*run, "trainer.epochs=8", "trainer.iters_per_epoch=6"],
            codes=(130,),
            interrupt_after="epoch 1/",
            check=lambda tmp: None if (tmp / "run" / "checkpoint.pt").exists() else "no checkpoint",
        ),
        # 6. nonsense values
        Case("teacher of another dataset", [*run, "teacher=fmnist_cnn"]),
        Case("negative loss weight", [*run, "method.generator_terms.bn.weight=-100"]),
        Case("infinite student learning rate", [*run, "optimizer.student.lr=inf"]),
        Case("NaN generator learning rate", [*run, "optimizer.generator.lr=nan"]),
        Case("infinite temperature", [*run, "method.generator_terms.adversarial.temperature=inf"]),
        Case("unknown loss term class", [*run, "method.generator_terms.bn._target_=x.BNStats"]),
        Case("zero teacher std", [*run, "teacher.std=[0]"]),
        Case("teacher mean not a number", [*run, "teacher.mean=[abc]"]),
        Case("empty teacher checkpoint", [*run, "teacher.checkpoint="]),
        Case("teacher name with a newline", [*run, "teacher.name='a\nb|c'"]),
        Case("unknown student architecture", [*run, "student.arch=nope"]),
        Case("negative W&B timeout", [*wandb, "logger.init_timeout=-5"]),
        Case("empty W&B project", [*wandb, "logger.project="]),
        Case("W&B group with a slash", [*wandb, "logger.group=a/b"]),
        Case("secret_env not a list", [*run, "runtime.secret_env=abc"]),
        # Hydra's own messages (exit 1, no traceback)
        Case("unknown option", [*run, "trainer.nonsense=1"], codes=(1,)),
        Case("unquoted non-ASCII run directory", [*TINY, "hydra.run.dir={tmp}/é"], codes=(1,)),
    ]
    return battery


# -- running and judging ------------------------------------------------------------------------
def run_case(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    args = [arg.replace("{tmp}", str(tmp)) for arg in case.args]
    env = environment(**case.env)
    if case.interrupt_after is None:
        return subprocess.run(
            command(case.entry, args),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    process = subprocess.Popen(
        command(case.entry, args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(case.interrupt_after):
            time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(seen) + out, err)


def judge(case: Case, result: subprocess.CompletedProcess, tmp: Path) -> tuple[str, str]:
    """The outcome's category and a few words on it."""
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in output:
        return "traceback", last
    problem = case.check(tmp) if case.check is not None else None
    if result.returncode not in case.codes or problem is not None:
        if result.returncode == 0 or problem is not None:
            return "silently accepted", problem or f"exit 0: {output.strip().splitlines()[-1:]}"
        return "other", f"exit {result.returncode}: {last}"
    if result.returncode == 0:
        return "handled", (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode == 1:
        return "Hydra's own message", last
    if last.startswith(("error: ", "stopped: ")):
        return "one-sentence error", last
    return "other", f"exit {result.returncode}: {last}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tadfkd.bench.bad_inputs", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("-k", help="run only the cases whose name holds this text")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="tadfkd-bad-inputs-"))
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    try:
        fixtures = Fixtures(base)
        for number, case in enumerate(cases(fixtures)):
            if args.k and args.k not in case.name:
                continue
            tmp = base / f"case{number}"
            tmp.mkdir()
            if case.prepare is not None:
                case.prepare(tmp)
            category, words = judge(case, run_case(case, tmp), tmp)
            counts[category] += 1
            print(f"{category:>20} | {case.name} | {words[:160]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    tried = sum(counts.values())
    hydra = counts["Hydra's own message"]
    print(
        f"tried {tried}: {counts['one-sentence error']} one-sentence errors, "
        f"{counts['handled']} handled, {hydra} Hydra's own messages, "
        f"{counts['traceback']} tracebacks, {counts['silently accepted']} silently accepted, "
        f"{counts['other']} other ({time.perf_counter() - started:.0f} s)"
    )
    return 0 if counts["traceback"] == counts["silently accepted"] == counts["other"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
