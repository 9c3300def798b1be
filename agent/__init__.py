"""LLM-Latency-Lens on-device agent: faithful timing of local llama.cpp inference."""

__version__ = "0.1.0"
