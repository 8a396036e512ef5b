"""Where and how a job runs: its device, CPU threads, glibc's malloc policy and random seeds,
and building objects from config nodes. Shared by the distillation job, the teacher job and the
benchmark."""

from __future__ import annotations

import ctypes
import os
import random
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from threadpoolctl import threadpool_limits

from tadfkd.base.errors import UserError

# Hydra's message for a ``_target_`` that names nothing importable: the target and its node.
UNLOCATABLE = re.compile(r"Error locating target '(?P<target>[^']*)'.*full_key: (?P<key>\S+)", re.S)


def build(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, passing a ``UserError`` raised while building through as is;
    a ``_target_`` that names nothing importable is a ``UserError`` naming its node."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        unlocatable = UNLOCATABLE.search(str(error))
        if unlocatable:
            raise UserError(
                f"{unlocatable['key']}._target_={unlocatable['target']!r} names no class that "
                "can be imported; check its spelling, and that its module is on the Python path."
            ) from None
        raise


def check_resolvable(cfg: DictConfig) -> None:
    """Resolve every interpolation of ``cfg`` once, before any work: one that cannot be (an
    unset environment variable, a key that does not exist) is a ``UserError`` naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "a config value"
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        why = re.sub(r"^\w+ raised while resolving interpolation: ", "", why).strip('"')
        raise UserError(
            f"{key} cannot be resolved ({why}); set what it refers to (e.g. the environment "
            f"variable), or give {key} a value."
        ) from None


# Environment variables whose values never reach a run's files or W&B (``runtime.secret_env``
# adds others); values shorter than this are not matched (they would match everywhere).
SECRET_ENV = ("WANDB_API_KEY",)
SHORTEST_SECRET = 6
REDACTED = "<redacted>"


def secret_values(extra_names: Sequence[str] = ()) -> list[str]:
    """The values of ``SECRET_ENV`` and ``extra_names`` in this process's environment."""
    values = (os.environ.get(name, "") for name in (*SECRET_ENV, *extra_names))
    return [value for value in values if len(value) >= SHORTEST_SECRET]


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret value in it replaced by ``REDACTED``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_secrets(cfg: DictConfig) -> None:
    """Replace, in ``cfg``, every value that resolves to text holding a secret (e.g. an
    interpolated ``${oc.env:WANDB_API_KEY}``) by that text with the secret ``REDACTED``, so
    that nothing downstream (the run's identity in its checkpoint, results.json, run.log, the
    W&B config, name, group and tags) ever holds it."""
    extra = OmegaConf.select(cfg, "runtime.secret_env")
    names = [str(name) for name in extra] if OmegaConf.is_list(extra) else []
    secrets = secret_values(names)
    if not secrets:
        return

    def walk(node: Any) -> None:
        keys = range(len(node)) if OmegaConf.is_list(node) else list(node.keys())
        for key in keys:
            value = node[key]
            if OmegaConf.is_config(value):
                walk(value)
            elif isinstance(value, str) and redact(value, secrets) != value:
                node[key] = redact(value, secrets)

    walk(cfg)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda`` and ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"runtime.device={name} was asked for but no CUDA device is available; use cpu."
        )
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(
            f"runtime.device={name} is not a device name; use auto, cpu or cuda."
        ) from error
    if device.type not in ("cpu", "cuda"):
        raise UserError(
            f"runtime.device={name} cannot train a network here; use auto, cpu or cuda."
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"runtime.device={name} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)."
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask: a SLURM or taskset allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of this machine have spent busy since boot (``/proc/stat``),
    or None where that file does not exist (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def busy_cores_of_others(window: float = 0.3) -> float:
    """How many cores other processes keep busy, measured over ``window`` seconds of this
    process sleeping (0 where it cannot be measured)."""
    before = machine_busy_seconds()
    if before is None:
        return 0.0
    own_before, start = time.process_time(), time.perf_counter()
    time.sleep(window)
    after = machine_busy_seconds()
    own = time.process_time() - own_before
    elapsed = time.perf_counter() - start
    return max(0.0, (after - before - own) / elapsed)


def auto_threads(cores: int, side_by_side: int, busy: float) -> int:
    """``runtime.threads=auto``: this job's share of the ``cores`` among the jobs running
    ``side_by_side``, less the cores other processes keep ``busy`` (rounded, at least 1).

    A thread that shares a core with a busy process stalls every parallel region of the
    others: on 2 cores beside one busy process, 2 threads ran a digits job up to 18x slower
    than 1 (docs/performance.md)."""
    share = max(1, cores // side_by_side)
    free = cores - round(busy)
    return max(1, min(share, free))


def set_threads(threads: int | str, side_by_side: int = 1) -> int:
    """Set the CPU threads of torch and of numpy's BLAS: ``auto`` is ``auto_threads`` of the
    cores available, the ``side_by_side`` jobs of a sweep (``JobContext.side_by_side``) and the
    busy cores of other processes measured now; a number is taken as is. Returns the count.

    numpy's BLAS keeps its own thread pool, all cores by default, whose threads keep spinning
    after a call: held to the same count (the BLAS libraries loaded by then)."""
    if threads == "auto":
        count = auto_threads(cores_available(), side_by_side, busy_cores_of_others())
    else:
        count = int(threads)
    torch.set_num_threads(count)
    threadpool_limits(limits=count, user_api="blas")
    return count


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# the largest mmap threshold glibc accepts: 32 MiB on a 64-bit system
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
# far above a run's working set, so the heap is never trimmed while it runs (the peak stays held)
TRIM_THRESHOLD = 1024 * 1024 * 1024


def glibc_version() -> str | None:
    """The C library's version when it is glibc (e.g. ``glibc 2.36``), else None."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return None
    return version if version and version.startswith("glibc") else None


def keep_freed_memory(enabled: bool = True) -> bool:
    """``runtime.keep_freed_memory``: have glibc's malloc keep the memory of freed tensors for
    the next ones, for the whole process. By default it maps each block above a threshold
    (128 KiB at first) afresh and unmaps it when freed, and trims the heap's free top, so that
    every batch's tensors fault their pages in again, zeroed by the kernel (docs/performance.md:
    1.5-2x the page faults of a benchmark process, 2-16% of its iteration). Blocks under 32 MiB
    now come from the heap, which is trimmed only past 1 GiB of free top. Memory layout only: no
    value changes. Returns whether it applied: not when ``enabled`` is false (which undoes no
    earlier call), nor where the C library is not glibc."""
    if not enabled or glibc_version() is None:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # a threshold set by hand ends glibc's raising of it as blocks are freed: set both
    applied = [
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return all(applied)


def malloc_policy(kept: bool) -> str:
    """What ``keep_freed_memory`` returned ``kept`` means, in words, for a benchmark's header."""
    if kept:
        return "keeps freed memory"
    return "its own policy" if glibc_version() else "not glibc (nothing set)"


def source_commit() -> str | None:
    """The git commit of this code (with ``+dirty`` when it has uncommitted changes), or None
    outside a git checkout: recorded with every result so a report says what code made it."""
    repository = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what torch reports elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return str(capabilities.get("cpu_name", "unknown CPU"))
