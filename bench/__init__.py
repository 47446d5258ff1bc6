"""Benchmarks beside the product, run by ``make bench`` from the repository root (never installed).

- ``python -m bench.engine``: training-step throughput of the engine against Hugging Face MoE models;
- ``python -m bench.platform``: what running inside a job costs, and how fast the dashboard hears of it.

Only the benchmarks import the product; nothing in ``builder`` or ``workers`` imports ``bench``.
"""
