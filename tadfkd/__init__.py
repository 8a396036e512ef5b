"""TA-DFKD: teacher-agnostic data-free knowledge distillation (Shin and Choi, AAAI 2024).

The subpackages, lowest first; each imports only those before it (docs/architecture.md):
``base`` (errors, atomic files, metric keys) -> ``data`` (sources, views) and ``models`` ->
``teachers`` (loading, BatchNorm folding) -> ``distillation`` (synthesizer, selection, loss
terms, objectives, the loop) -> ``run`` (one job: checks, run directory, checkpoints,
tracking, the teacher job) -> ``analysis`` (results of many runs, reports) -> ``bench``.
Entry points: ``run.py`` and ``python -m tadfkd.train_teacher``.
"""
