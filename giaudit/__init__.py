"""giaudit: what can a curious server reconstruct from the updates federated clients share?

The flow is one-way: scenario -> defenses -> attack -> metrics -> report -> verdict.
"""
__version__ = "0.1.0"
