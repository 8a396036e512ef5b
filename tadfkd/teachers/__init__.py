"""Pretrained teachers: reading checkpoints safely into a registered architecture, their
metadata and digests (``loading``), and the BatchNorm-folded copy for no-grad forwards
(``folding``). Imports ``tadfkd.base`` and ``tadfkd.models``.
"""
