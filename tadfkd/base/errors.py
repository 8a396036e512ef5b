"""Errors a user can cause and fix, runs stopped early, and the one table of their exit codes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong architecture, bad value).

    The message is one sentence naming the thing and the fix; entry points print it
    without a traceback and exit with code 2.
    """


class DatasetMissing(UserError):
    """A dataset's files are absent (and could not be downloaded); the message says where to
    put them."""


class RunDirectoryInUse(UserError):
    """Another live run holds the run directory's lock: the directory is that run's, so the
    refused job writes nothing into it (no ``failed.json`` in a sweep)."""


class RunStopped(Exception):
    """The run stopped before its last epoch, its state checkpointed (a stop signal, a
    non-finite loss); the message says why and how to go on. Entry points print it and exit
    with its code in ``EXIT_CODES``."""


class Interrupted(RunStopped):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT) arrived: the process exits, a sweep included,
    and the same command resumes it."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class NonFiniteLoss(RunStopped):
    """A loss term became NaN or infinite (``runtime.on_nonfinite=stop``)."""


class SignalReceived(BaseException):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT; its name is the message) arrived outside the
    training loop, where nothing is in flight: raised by the signal handler and, like
    ``KeyboardInterrupt``, not an ``Exception``, so that no ``except Exception`` on the way
    (e.g. around a file being read) swallows it. The job turns it into ``Interrupted``."""


# The exit code of a process that ends with an error of each kind, the first that matches
# (anything else is a bug: 1); a stop signal's code is 130 for SIGINT (128 + 2, what a shell
# reports for Ctrl-C), the stop's code for the others.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (NonFiniteLoss, 4),
    (RunStopped, 3),
    (SignalReceived, 3),
    (UserError, 2),
)
SIGINT_EXIT_CODE = 130


def signal_of(error: BaseException) -> str | None:
    """The name of the stop signal that ended the run with ``error``, or None."""
    if isinstance(error, Interrupted):
        return error.signal_name
    return str(error) if isinstance(error, SignalReceived) else None


def exit_code(error: BaseException) -> int:
    """The exit code an entry point ends with after ``error`` (``EXIT_CODES``)."""
    if signal_of(error) == "SIGINT":
        return SIGINT_EXIT_CODE
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)


def headline(error: BaseException) -> str | None:
    """The one line an entry point prints for ``error``: ``stopped: ...`` for a run stopped,
    ``error: ...`` for a user's mistake; None for a bug (its traceback shows instead)."""
    if isinstance(error, RunStopped):
        return f"stopped: {error}"
    if isinstance(error, UserError):
        return f"error: {error}"
    return None


@contextlib.contextmanager
def exit_on_known_errors() -> Iterator[None]:
    """Around an entry point's work: a user's mistake or a stopped run prints its ``headline``
    and exits with its ``exit_code``; any other error goes on up with its traceback."""
    try:
        yield
    except (UserError, RunStopped) as error:
        print(headline(error), file=sys.stderr, flush=True)
        sys.exit(exit_code(error))
