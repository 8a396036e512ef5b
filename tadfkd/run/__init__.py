"""One job from a composed config to its files: the Hydra context its entry point reads once
(context), config checks, device and threads, building the distiller, the run directory and its
lock, checkpoints and resume, tracking (the W&B record), progress lines, results.json and
failed.json, and the teacher-training job (``legacy``: the identity former versions wrote into
checkpoints, in today's form). Imports everything below it; never ``analysis`` or ``bench``.
"""
