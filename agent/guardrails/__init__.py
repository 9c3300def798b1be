"""Guardrails: checks timed as separate stages (input, threat, output) around any strategy."""
