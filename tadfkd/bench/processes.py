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
import signal
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
        """The malloc policy it runs under (in words), torch's thread count and those of the
        BLAS libraries loaded (numpy's, scikit-learn's), for the benchmark's header."""
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

    def profile(self) -> tuple[str, float | None]:
        """One profiled iteration's table and counts, as text for the parent to print, and
        (on a CPU) the share of its operator time in convolutions and matmuls."""
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            dense_share = profile(self.stats.distiller, self.stats.device)
        return output.getvalue(), dense_share


def _answer(connection: Connection, work: Callable[[], Any], send_result: bool = True) -> Any:
    """Send ``work()``'s result (or only that it is done); a user's mistake is sent as its
    sentence (the parent raises it as a ``UserError``: one sentence, exit 2), any other error
    as its traceback. Returns the result (None after an error)."""
    try:
        result = work()
    except UserError as error:
        connection.send(("user_error", str(error)))
    except BaseException:  # the parent raises it, with this traceback
        connection.send(("failed", traceback.format_exc()))
    else:
        connection.send(("done", result if send_result else None))
        return result
    return None


def _serve(connection: Connection, spec: PathSpec) -> None:
    """The child's loop: build the path, then answer ``(method, args)`` requests until
    ``close`` or until the parent is gone; errors go back to the parent, never raised here."""
    # Ctrl-C reaches the whole process group: the parent alone reacts, and ends its children
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = _answer(connection, lambda: _Path(spec), send_result=False)
    if path is None:
        return
    while True:
        try:
            method, args = connection.recv()
        except EOFError:  # the parent ended without asking
            return
        if method == "close":
            return
        _answer(connection, partial(_invoke, path, method, args))


def _invoke(path: _Path, method: str, args: tuple) -> Any:
    return getattr(path, method)(*args)


class PathProcess:
    """A benchmark path in a process of its own, spawned: it inherits the environment, but
    nothing of this process's torch, thread pools or heap. Offers ``PathStats``'s timing
    methods (``bench.timing.time_paths`` drives it like one)."""

    def __init__(self, spec: PathSpec) -> None:
        self.name = spec.name
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        # not a daemon: Inductor (--compile) refuses worker pools in daemonic processes;
        # close() ends it
        self._process = context.Process(target=_serve, args=(child, spec))
        try:
            self._process.start()
        except BaseException:
            self._connection.close()
            raise
        finally:
            child.close()
        try:
            self._reply()  # built, its FLOPs counted
            self.description: dict[str, Any] = self._call("describe")
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, *args: Any) -> Any:
        try:
            self._connection.send((method, args))
        except (BrokenPipeError, ConnectionResetError):
            raise self._ended() from None
        return self._reply()

    def _reply(self) -> Any:
        try:
            status, value = self._connection.recv()
        except (EOFError, ConnectionResetError):
            raise self._ended() from None
        if status == "user_error":
            raise UserError(value)
        if status == "failed":
            raise RuntimeError(f"the benchmark's {self.name} path failed in its process:\n{value}")
        return value

    def _ended(self) -> RuntimeError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        return RuntimeError(
            f"the benchmark's {self.name} path process ended without an answer"
            + ("" if code is None else f" (exit code {code})")
        )

    def start_timing(self) -> None:
        """Forget the counts so far; timed iterations follow."""
        self._call("start_timing")

    def time_iteration(self) -> None:
        """One timed iteration (or a warm-up one, whose timing ``start_timing`` forgets), in
        the path's process."""
        self._call("time_iteration")

    def figures(self, matmuls: dict[str, float]) -> dict[str, float | None]:
        """``PathStats.figures``: the timed iterations' figures, in the units of
        ``bench.compare.ROWS``, against the ``matmuls`` rates (FLOP/s by dtype name)."""
        return self._call("figures", matmuls)

    def compile(self) -> tuple[float, int]:
        """``torch.compile`` the path: its warm-up seconds and the graphs compiled so far."""
        return self._call("compile")

    def compiled_graphs(self) -> int:
        """Graphs compiled so far in the path's process."""
        return self._call("compiled_graphs")

    def profile(self) -> tuple[str, float | None]:
        """The table and counts of one profiled iteration, as text, and (on a CPU) the share of
        its operator time in convolutions and matmuls (a fraction)."""
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
