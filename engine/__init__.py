"""Lumen's inference engine: GGUF loading, the Llama model, sampling and the engine loop.

The engine knows nothing of gRPC or of the service layer; it may use `telemetry`.
"""
