"""Lumen's inference engine (`lumen.engine`): one folder per concept.

core/ the step loop; model/ the Llama forward, linear layers, KV cache and attention;
weights/ loaders and quantization formats; native/ the C kernels; triton_kernels/ the GPU
kernels; tokenizer/ text to ids and back, stop strings; sampling/ the sampler, logprobs and
rejection sampling; speculative/ draft proposers; demo/ the embedded demo model.

The engine knows nothing of gRPC or of the service layer; it may use `lumen.telemetry`'s
OpenTelemetry API.
"""
