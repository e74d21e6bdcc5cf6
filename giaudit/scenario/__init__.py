"""Scenario: the global model and the federated client's step (data sources live in `giaudit.data`)."""
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.models import build_model

__all__ = ["Scenario", "pretrain", "build_model"]
