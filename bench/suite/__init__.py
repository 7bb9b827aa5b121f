"""Benchmark suite of heterogeneity kinds: datasets with ground truth, built by one command
(``python bench/suite/build.py``), scored by ``bench/bench_vs_cryodrgn.py --suite``."""
