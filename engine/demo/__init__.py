"""The embedded demo model and the synthetic GGUF writer it (and the benchmarks) use."""
