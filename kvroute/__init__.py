"""kvroute: serve multi-turn LLM chat from CPU workers with each session's KV cache kept warm."""

__version__ = "0.1.0"
