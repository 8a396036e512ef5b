"""Errors a user can cause and fix."""


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong architecture, bad value).

    The message is one sentence naming the thing and the fix; entry points print it
    without a traceback and exit with code 2.
    """


class DatasetMissing(UserError):
    """A dataset's files are absent (and could not be downloaded); the message says where to
    put them."""
