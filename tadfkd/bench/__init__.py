"""Benchmarks: ``python -m tadfkd.bench`` (the fast path against the published-style one:
``compare``, built by ``setting``, the published-style path's settings and selection rule in
``published``, timed by ``timing``, each path in a process of its own by ``processes``,
``agreement`` of their keep decisions), ``components`` (where one iteration's time goes),
``threads`` (beside a busy process) and ``bad_inputs`` (the reliability battery, its cases in
``bad_cases``). Top of the stack: imports anything.
"""
