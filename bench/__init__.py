"""Benchmark suite of the routed DOPD loss (``pytest bench --benchmark-only``; report: ``python -m bench.report``).

Kept out of the normal test run: the project's pytest ``testpaths`` is ``tests`` only.
"""
