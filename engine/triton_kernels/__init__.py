"""Hand-written GPU kernels (Triton) the engine uses on CUDA; each has a pure-torch reference and a test."""
