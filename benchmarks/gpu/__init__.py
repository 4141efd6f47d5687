"""The lent GPU's shell scripts and the configs they write (``python -m benchmarks.gpu.configs``)."""
