"""Shared maths for gradient-matching attacks (and the client that they mirror)."""
