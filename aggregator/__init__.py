"""LLM-Latency-Lens central aggregator: receives measurement batches from agents and feeds fleet dashboards."""

__version__ = "0.1.0"
