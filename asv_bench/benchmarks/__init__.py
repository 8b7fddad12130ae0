"""fastce's asv benchmarks (CPU): see bench_cross_entropy.py."""
