"""How ``runtime.threads=auto`` copes with a busy machine, measured in one run.

    python -m tadfkd.bench.threads                 # the digits setting, 6 iterations a run
    python -m tadfkd.bench.threads --setting fashion_mnist --iters 3

Each configuration is a fresh process that builds the benchmark's distiller (random weights,
``bench.setting``), sets its threads and malloc policy as the distillation job does, runs one
warm-up iteration and times ``--iters`` more. The competing process is started by this script:
one single-thread process multiplying matrices without pause (another training job, as far as
the CPU can tell), running for the whole of the timed configuration. Printed: seconds per
iteration of each configuration and the ratios to one thread on an idle machine; the target is
that ``auto`` beside the competing process stays within 1.5x of that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from tadfkd.base.errors import exit_on_known_errors

# (name, runtime.threads, with the competing process)
CONFIGURATIONS = (
    ("1 thread, idle", "1", False),
    ("auto, idle", "auto", False),
    ("1 thread, beside a busy process", "1", True),
    ("auto, beside a busy process", "auto", True),
    ("all cores, beside a busy process", "all", True),
)
COMPETITOR = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(512, 512)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


def worker(setting: str, threads: str, iters: int) -> dict[str, float | int]:
    """Build the setting's distiller, set the threads, time ``iters`` iterations (after one)."""
    from tadfkd.bench.setting import SETTINGS, bench_config, build_path
    from tadfkd.run.runtime import cores_available, keep_freed_memory, set_threads

    count = set_threads(str(cores_available()) if threads == "all" else threads)
    cfg = bench_config([*SETTINGS[setting], "runtime.device=cpu"])
    keep_freed_memory(cfg.runtime.keep_freed_memory)  # as run.py's jobs
    distiller = build_path(cfg, torch.device("cpu"), published=False, seed=0)
    distiller.iterate()
    start = time.perf_counter()
    for _ in range(iters):
        distiller.iterate()
    return {"threads": count, "s_per_iter": (time.perf_counter() - start) / iters}


def run_configuration(setting: str, threads: str, busy: bool, iters: int) -> dict:
    """One configuration in a fresh process, the competing process around it when ``busy``."""
    competitor = None
    if busy:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
        time.sleep(2.0)  # let it start and load the core
    try:
        command = [sys.executable, "-m", "tadfkd.bench.threads", "--worker", threads]
        command += ["--setting", setting, "--iters", str(iters)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from tadfkd.bench.setting import SETTINGS, positive_int

    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.bench.threads", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--setting", default="small", choices=sorted(SETTINGS))
    parser.add_argument(
        "--iters", type=positive_int, default=6, help="timed iterations per configuration"
    )
    parser.add_argument("--worker", metavar="THREADS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.setting, args.worker, args.iters)))
        return {}
    from tadfkd.bench.setting import device_name
    from tadfkd.run.runtime import cores_available

    cpu = device_name(torch.device("cpu"))
    print(
        f"CPU: {cpu}, {cores_available()} cores available; setting {args.setting}, "
        f"{args.iters} timed iterations per configuration, each in a fresh process"
    )
    results = {}
    for name, threads, busy in CONFIGURATIONS:
        results[name] = run_configuration(args.setting, threads, busy, args.iters)
        figures = results[name]
        print(f"{name:<34} {figures['threads']} thread(s)  {figures['s_per_iter']:.3f} s/iteration")
    base = results["1 thread, idle"]["s_per_iter"]
    for name in results:
        print(f"ratio to 1 thread, idle: {name:<34} {results[name]['s_per_iter'] / base:.2f}x")
    return results


if __name__ == "__main__":
    with exit_on_known_errors():  # a bad --set value: one sentence, exit 2
        main()
