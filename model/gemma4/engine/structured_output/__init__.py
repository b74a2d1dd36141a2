"""Structured outputs: constraining sampling to a grammar (JSON schema, JSON object, regex, choice)."""
