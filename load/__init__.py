"""Load testing for a running Lumen server: `lumen bench` and the ghz configs in load/ghz/.

Client side only: nothing here imports the engine or the server.
"""
from lumen.load.generator import LoadConfig, LoadResult, RequestRecord, run_load
from lumen.load.prompts import PromptSpec, load_prompts

__all__ = ["LoadConfig", "LoadResult", "PromptSpec", "RequestRecord", "load_prompts", "run_load"]
