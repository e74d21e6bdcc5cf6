"""Integrations with real federated-learning stacks (optional extras, imported lazily)."""
