"""Benchmarks (``ringrt bench <name>``). Each prints a table and writes JSON (and PNG plots where useful).

Speed targets are ratios measured in one run (machines are noisy), never timed tests.
Read ``cli.py`` (the list of benchmarks), then the one you run: ``attention.py``, ``compare.py``,
``compression.py``, ``lambda_bench.py``, ``varlen.py``; ``report.py`` writes the results.

A tool: may import any ringrt package; nothing but the command line (``ringrt.cli``) and the other
tools imports it (``tests/test_architecture.py``).
"""
