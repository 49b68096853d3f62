"""Throughput benchmarks (``bench``) and ahead-of-time memory / FLOP plans (``plan``)."""
