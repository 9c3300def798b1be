"""Guardrails: checks run around an inference (input validation, threat detection, output filtering), each timed."""
