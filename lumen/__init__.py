"""Lumen: an observability-first LLM inference service.

One namespace for everything the project installs: `lumen.engine`, `lumen.service`,
`lumen.telemetry`, `lumen.load` (from the repository's top-level folders of those names, see
setup.py) and the generated gRPC stubs `lumen.v1`.
"""
