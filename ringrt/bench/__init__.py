"""Benchmarks. Each prints a table and writes JSON (and PNG plots where useful).

Speed targets are ratios measured in one run (machines are noisy), never timed tests.
"""
