"""The algorithm: the synthesizer (generate, select, refill), selection rules, loss terms and
the objectives built from them, forward-hook recorders, precision, and the distillation loop
with its evaluation. Imports ``base``, ``data``, ``models`` and ``teachers``; never ``run``.
"""
