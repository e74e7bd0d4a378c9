"""Benchmarks for gradsel: the shared harness (``benchmarks.harness``), the engine benchmark
(``bench_engine.py``) and the peer comparison (``bench_peers.py``). Run the scripts from the repo root,
e.g. ``python benchmarks/bench_peers.py --quick``."""
