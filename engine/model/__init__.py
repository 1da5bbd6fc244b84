"""The Llama model: config, forward, linear layers by weight kind, KV cache, attention backends."""
