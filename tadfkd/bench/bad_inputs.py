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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tadfkd.bench.bad_cases import ROOT, Case, Fixtures, cases, command, environment


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
