"""Lumen's gRPC service: API validation, model registry, server and CLI.

The service only validates, tokenizes, submits to an engine and streams what it
gets back; it never runs model code on the event loop.
"""
