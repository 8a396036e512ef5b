"""Errors a user can cause and fix."""


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong architecture, bad value).

    The message is one sentence naming the thing and the fix; entry points print it
    without a traceback and exit with code 2.
    """


class DatasetMissing(UserError):
    """A dataset's files are absent (and could not be downloaded); the message says where to
    put them."""


class RunStopped(Exception):
    """The run stopped before its last epoch, its state checkpointed (a stop signal, a
    non-finite loss); the message says why and how to go on. ``run.py`` prints it and exits
    with ``exit_code``."""

    exit_code = 3


class Interrupted(RunStopped):
    """A stop signal (SIGTERM, SIGUSR1) arrived: the process exits, a sweep included, and the
    same command resumes it."""


class NonFiniteLoss(RunStopped):
    """A loss term became NaN or infinite (``trainer.on_nonfinite=stop``)."""

    exit_code = 4
