"""Guardrails: checks timed as stages around a strategy's inference."""
