"""The one-shot benchmark behind ``lens-agent bench``."""
