"""Many runs at once: ``jobs`` reads a sweep directory or a W&B group, ``statistics`` computes the
numbers, ``finding`` states what they say, ``markdown`` and ``plots`` present them, ``report``
writes the files, and ``sweep`` is the Hydra callback that writes the report when a sweep ends.
Imports ``base`` and ``run`` (the files a run writes).
"""
