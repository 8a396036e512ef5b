"""This checkout's fast path against another checkout's, iterations alternated, in one run.

    python -m tadfkd.bench.checkouts /tmp/older --setting fashion_mnist --pairs 30

A change of code has no config switch for ``tadfkd.bench.components --against`` to flip, and
two benchmark runs taken one after the other differ by the machine's drift (10-20% within
minutes here) more than most changes do. This runs the fast path of each checkout in a process
of its own, started in that checkout (its ``tadfkd`` package, this interpreter and its
libraries), both on the same random weights (``bench.setting``), and alternates their
iterations pair by pair as ``--against`` does: which runs first swaps each pair, both
iterations of a pair start from the same seed of torch's random generator, and the median of
the paired differences is printed with each side's median and the generated batches per
student step (the work an iteration did). The worker uses only what the benchmark's setting
module has offered since round seven, so the other checkout may be an older commit.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from tadfkd.base.errors import UserError, exit_on_known_errors
from tadfkd.bench.setting import SETTINGS, positive_int

# run in a checkout (its root first on sys.path): build the setting's fast path at the given
# threads, warm it up, then per line of stdin (a seed) one iteration; print its seconds and the
# batches it generated
WORKER = """
import sys, time
sys.path.insert(0, ".")
import torch
from tadfkd.base import schema
from tadfkd.bench.setting import SETTINGS, bench_config, build_path
from tadfkd.run.runtime import keep_freed_memory, set_threads
setting, threads, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
set_threads(threads)
cfg = bench_config([*SETTINGS[setting], "runtime.device=cpu"])
keep_freed_memory(cfg.runtime.keep_freed_memory)
path = build_path(cfg, torch.device("cpu"), published=False, seed=0)
for _ in range(warmup):
    path.iterate()
print("ready", path.schedule.batch_size * path.schedule.student_steps, flush=True)
for line in sys.stdin:
    generated = float(path.meter.sums.get(schema.GENERATED, 0.0))
    torch.manual_seed(int(line))
    start = time.perf_counter()
    path.iterate()
    seconds = time.perf_counter() - start
    print(seconds, float(path.meter.sums[schema.GENERATED]) - generated, flush=True)
"""


class Checkout:
    """One checkout's fast path in a worker process of its own (``WORKER``)."""

    def __init__(self, root: Path, setting: str, threads: int, warmup: int) -> None:
        self.root = root
        command = [sys.executable, "-c", WORKER, setting, str(threads), str(warmup)]
        self.process = subprocess.Popen(
            command, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        words = self._reply().split()
        if not words or words[0] != "ready":
            raise self._failed()
        self.samples_per_iteration = float(words[1])  # a batch for each student step

    def iterate(self, seed: int) -> tuple[float, float]:
        """One iteration from ``seed``: its seconds and its generated batches per student step."""
        self.process.stdin.write(f"{seed}\n")
        self.process.stdin.flush()
        words = self._reply().split()
        if len(words) != 2:
            raise self._failed()
        return float(words[0]), float(words[1]) / self.samples_per_iteration

    def _reply(self) -> str:
        return self.process.stdout.readline()

    def _failed(self) -> UserError:
        """One sentence for a worker that stopped (its own error is printed above it): most
        often a checkout older than the worker's needs (``bench.setting``'s ``build_path``)."""
        self.close()
        return UserError(
            f"the fast path of {self.root} stopped (exit code {self.process.returncode}); "
            "its error is above."
        )

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def checkout_root(text: str) -> Path:
    """An argparse type: a directory holding the ``tadfkd`` package, as an absolute path."""
    root = Path(text).expanduser().resolve()
    if not (root / "tadfkd" / "bench" / "setting.py").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a checkout of tadfkd")
    return root


def alternated(this: Checkout, other: Checkout, pairs: int) -> list[tuple[tuple, tuple]]:
    """``pairs`` (this, other) pairs of (seconds, batches per student step), alternated."""
    found = []
    for pair in range(pairs):
        order = (other, this) if pair % 2 else (this, other)
        done = {id(side): side.iterate(pair) for side in order}
        found.append((done[id(this)], done[id(other)]))
    return found


def summary(found: list[tuple[tuple, tuple]], other: Path) -> str:
    """The medians of each side and of the paired differences, in one line."""
    this_ms = statistics.median(a[0] for a, _ in found) * 1e3
    other_ms = statistics.median(b[0] for _, b in found) * 1e3
    difference = statistics.median(a[0] - b[0] for a, b in found) * 1e3
    batches = [statistics.fmean(side[1] for side in sides) for sides in zip(*found, strict=True)]
    return (
        f"alternated iterations, {len(found)} pairs: this checkout {this_ms:.1f} ms, {other} "
        f"{other_ms:.1f} ms (medians; {batches[0]:.2f} and {batches[1]:.2f} generated batches "
        f"per student step); this checkout takes {difference:+.1f} ms an iteration "
        f"({difference / other_ms:+.1%}; the median of the paired differences)"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.bench.checkouts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("other", type=checkout_root, help="the other checkout's root")
    parser.add_argument("--setting", default="fashion_mnist", choices=sorted(SETTINGS))
    parser.add_argument("--pairs", type=positive_int, default=20, help="alternated pairs")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads each")
    parser.add_argument(
        "--warmup", type=positive_int, default=2, help="untimed iterations each, first"
    )
    args = parser.parse_args(argv)
    this_root = Path(__file__).resolve().parents[2]
    sides = []
    try:
        for root in (this_root, args.other):
            sides.append(Checkout(root, args.setting, args.threads, args.warmup))
        line = summary(alternated(sides[0], sides[1], args.pairs), args.other)
    finally:
        for side in sides:
            side.close()
    print(f"setting {args.setting}, {args.threads} thread(s) each; {line}")
    return line


if __name__ == "__main__":
    with exit_on_known_errors():
        main()
