"""Many runs at once: reading a sweep directory or a W&B group, the report (tables, paired
differences with intervals, plots) and the Hydra callback that writes it when a sweep ends.
Imports ``base`` and ``run`` (the files a run writes).
"""
