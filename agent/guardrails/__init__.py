"""Guardrails timed beside the inference: input validation, threat detection and output filtering as separately
timed stages around any strategy (docs/guardrails.md).

``base`` holds the shared types and vocabularies (and the ``empty`` kind), ``registry`` finds a kind's module and
checks a check's options, ``pipeline`` runs a set of checks around a strategy, ``plugins`` adapts a team's own
guardrail found through the ``llm_latency_lens.guardrails`` entry-point group. Nothing heavy is imported at module
level anywhere in this package: reading the configuration stays light.
"""
