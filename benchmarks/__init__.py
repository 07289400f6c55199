"""gkd_d2's benchmarks, with the data and statistics only they use. Run each as a module from the
repository root (``python -m benchmarks.bench_step``), so that it imports its siblings."""
