"""Benchmarks: ``python -m tadfkd.bench`` (the fast path against the published-style one,
``compare``; that path's settings and selection rule: ``published``), ``components`` (where one
iteration's time goes), ``threads`` (beside a busy process) and ``bad_inputs`` (the reliability
battery). Top of the stack: imports anything.
"""
