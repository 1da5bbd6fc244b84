"""LoRA adapters: read from GGUF or PEFT files (adapter), held on the model's device and applied
to the adapted rows of a step (weights), loaded and unloaded while serving (registry)."""
