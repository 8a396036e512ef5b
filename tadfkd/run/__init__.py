"""One job from a composed config to its files: config checks, device and threads, building
the distiller, the run directory and its lock, checkpoints and resume, tracking (W&B),
progress lines, results.json and failed.json, and the teacher-training job (``legacy``: the
identity former versions wrote into checkpoints, in today's form).
Imports everything below it; never ``analysis`` or ``bench``.
"""
