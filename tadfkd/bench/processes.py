"""Each path of the benchmark in a process of its own, driven one iteration at a time.

A path's process sets its threads and its malloc policy before it builds anything: the fast
path the run's (``runtime.keep_freed_memory``, as ``run.py``'s jobs), the published-style path
the C library's own, as the published code runs. Both are process state (glibc also raises its
mmap threshold as large blocks are freed), so a path timed in the other's process would inherit
the other's. The parent alternates the two processes iteration by iteration, one at a time, so
that drift on a shared machine still hits both alike.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import torch
from omegaconf import DictConfig
from threadpoolctl import threadpool_info, threadpool_limits

from tadfkd.base.errors import UserError
from tadfkd.bench.setting import build_path
from tadfkd.bench.timing import PathStats, compile_path, compiled_graphs, profile
from tadfkd.run.runtime import keep_freed_memory, malloc_policy


@dataclass(frozen=True)
class PathSpec:
    """What a path's process builds and how it runs: ``threads`` None leaves torch's default
    (a GPU); ``keep_freed_memory`` is the malloc policy to set before anything is built."""

    name: str
    cfg: DictConfig
    device: str
    published: bool
    seed: int
    threads: int | None
    keep_freed_memory: bool


class _Path:
    """The child's side: one path's ``PathStats``, built after the threads and malloc policy
    are set, its FLOPs counted (which is also its warm-up iteration)."""

    def __init__(self, spec: PathSpec) -> None:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
            threadpool_limits(limits=spec.threads)  # numpy's BLAS and scikit-learn's OpenMP
        self.kept_memory = keep_freed_memory(spec.keep_freed_memory)
        device = torch.device(spec.device)
        self.stats = PathStats(build_path(spec.cfg, device, spec.published, spec.seed), device)
        self.stats.count_flops()

    def describe(self) -> dict[str, Any]:
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return {
            "malloc": malloc_policy(self.kept_memory),
            "threads": torch.get_num_threads(),
            "blas_threads": blas,
        }

    def start_timing(self) -> None:
        self.stats.start_timing()

    def time_iteration(self) -> None:
        self.stats.time_iteration()

    def figures(self, matmuls: dict[str, float]) -> dict[str, float | None]:
        return self.stats.figures(matmuls)

    def compile(self) -> tuple[float, int]:
        """``torch.compile`` the path (one timed warm-up iteration): its seconds, and the
        graphs compiled so far in this process."""
        compile_path(self.stats)
        return self.stats.warmup_seconds, compiled_graphs()

    def compiled_graphs(self) -> int:
        return compiled_graphs()

    def profile(self) -> str:
        """One profiled iteration's table and counts, as text for the parent to print."""
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            profile(self.stats.distiller, self.stats.device)
        return output.getvalue()


def _answer(connection: Connection, work: Callable[[], Any], send_result: bool = True) -> Any:
    """Send ``work()``'s result (or only that it is done); a user's mistake is sent as itself
    (the parent raises it: one sentence), any other error as its traceback. Returns the result
    (None after an error)."""
    try:
        result = work()
    except UserError as error:
        connection.send(("user_error", error))
    except BaseException:  # noqa: BLE001 - the parent raises it, with this traceback
        connection.send(("failed", traceback.format_exc()))
    else:
        connection.send(("done", result if send_result else None))
        return result
    return None


def _serve(connection: Connection, spec: PathSpec) -> None:
    """The child's loop: build the path, then answer ``(method, args)`` requests until
    ``close``; errors go back to the parent, never raised here."""
    path = _answer(connection, lambda: _Path(spec), send_result=False)
    if path is None:
        return
    while True:
        method, args = connection.recv()
        if method == "close":
            return
        _answer(connection, partial(_invoke, path, method, args))


def _invoke(path: _Path, method: str, args: tuple) -> Any:
    return getattr(path, method)(*args)


class PathProcess:
    """A benchmark path in a process of its own (spawned: nothing of this process's torch,
    thread pools or heap is inherited), with ``PathStats``'s timing methods."""

    def __init__(self, spec: PathSpec) -> None:
        self.name = spec.name
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec), daemon=True)
        self._process.start()
        child.close()
        try:
            self._reply()  # built
            # the policy it runs under, its torch and BLAS thread counts
            self.description: dict[str, Any] = self._call("describe")
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, *args: Any) -> Any:
        self._connection.send((method, args))
        return self._reply()

    def _reply(self) -> Any:
        try:
            status, value = self._connection.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(
                f"the benchmark's {self.name} path process ended without an answer "
                f"(exit code {self._process.exitcode})"
            ) from None
        if status == "user_error":
            raise value
        if status == "failed":
            raise RuntimeError(f"the benchmark's {self.name} path failed in its process:\n{value}")
        return value

    def start_timing(self) -> None:
        self._call("start_timing")

    def time_iteration(self) -> None:
        self._call("time_iteration")

    def figures(self, matmuls: dict[str, float]) -> dict[str, float | None]:
        return self._call("figures", matmuls)

    def compile(self) -> tuple[float, int]:
        return self._call("compile")

    def compiled_graphs(self) -> int:
        return self._call("compiled_graphs")

    def profile(self) -> str:
        return self._call("profile")

    def close(self) -> None:
        """End the process (asked first; terminated if it does not end within seconds)."""
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._connection.send(("close", ()))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._connection.close()

    def __enter__(self) -> PathProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
