"""Benchmark scripts (``bench_*.py``, each run alone) and the harness they share; not installed."""
