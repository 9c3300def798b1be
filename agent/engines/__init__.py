"""Inference engines the lens times."""
