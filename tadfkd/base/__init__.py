"""What every other part shares: the user-error classes and exit codes (``errors``), atomic and
checked file writes (``files``) and the metric keys and result fields (``schema``).
Imports nothing of tadfkd.
"""
