"""The C kernels for CPUs: sources in csrc/, built and loaded by library.py, called through kernels.py."""
