"""Errors a user can cause and fix."""


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
    non-finite loss); the message says why and how to go on. ``run.py`` prints it and exits
    with ``exit_code``."""

    exit_code = 3


class Interrupted(RunStopped):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT) arrived: the process exits, a sweep included,
    and the same command resumes it. Exit code 3, or 130 for SIGINT (Ctrl-C), as a shell
    expects of a process it interrupted."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.exit_code = stop_exit_code(signal_name)


class NonFiniteLoss(RunStopped):
    """A loss term became NaN or infinite (``trainer.on_nonfinite=stop``)."""

    exit_code = 4


class SignalReceived(BaseException):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT; its name is the message) arrived outside the
    training loop, where nothing is in flight: raised by the signal handler and, like
    ``KeyboardInterrupt``, not an ``Exception``, so that no ``except Exception`` on the way
    (e.g. around a file being read) swallows it. The job turns it into ``Interrupted``."""


def stop_exit_code(signal_name: str) -> int:
    """The exit code of a run stopped by ``signal_name``: 130 for SIGINT (128 + 2, what a shell
    reports for Ctrl-C), else 3."""
    return 130 if signal_name == "SIGINT" else RunStopped.exit_code


def exit_code(error: BaseException) -> int:
    """The exit code ``run.py`` ends with after ``error``: a stopped run's own (3: a stop signal,
    130: SIGINT, 4: a non-finite loss), 2 for a user's mistake, 1 for anything else."""
    if isinstance(error, SignalReceived):
        return stop_exit_code(str(error))
    if isinstance(error, RunStopped):
        return error.exit_code
    return 2 if isinstance(error, UserError) else 1
