"""Model files into weights: GGUF and Hugging Face loaders, quantization formats, resident memory."""
