"""Scenario: models, data sources and the federated client's step."""
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.data import ImageDataset, load_dataset
from giaudit.scenario.models import build_model

__all__ = ["Scenario", "pretrain", "ImageDataset", "load_dataset", "build_model"]
