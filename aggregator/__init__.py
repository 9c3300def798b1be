"""LLM-Latency-Lens central aggregator: receives measurement batches from the devices and feeds fleet dashboards."""

__version__ = "0.1.0"
