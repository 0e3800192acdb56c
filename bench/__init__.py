"""Benchmarks: ``make bench`` (``python -m bench``) runs them all, ``python -m bench NAME`` one.

Every figure is printed next to a baseline measured in the same run on the same machine, so a
reader gets ratios rather than numbers that only mean something on the author's laptop.
Results also go to ``bench/results/latest.json`` (git-ignored).

Adding a benchmark: a module in this package with a function decorated by
:func:`bench.registry.benchmark` that returns a :class:`bench.registry.Report`. ``python -m
bench`` imports every module of the package, so nothing else needs registering. Keep it
bounded in count and time, and bind only to 127.0.0.1.
"""
