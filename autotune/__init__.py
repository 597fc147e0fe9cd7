"""Autotuning of generated kernels: a config space per call, an optuna search over it,
GPU timing, and a persistent cache that `Kernel.__call__` consults so a tuned shape
runs with its best config from then on (see docs/autotune.md)."""
