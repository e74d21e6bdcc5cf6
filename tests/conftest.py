"""Shared fixtures. Tests never touch the network; face data in ../shared/data is optional."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def mnist32():
    from giaudit.data import load_mnist5k

    return load_mnist5k(size=32)


@pytest.fixture(autouse=True)
def _private_utility_cache(monkeypatch, tmp_path_factory):
    """Utility results a test computes never land in the user's ~/.cache."""
    monkeypatch.setenv("GIAUDIT_CACHE", str(tmp_path_factory.getbasetemp() / "giaudit-cache"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network socket fails the test."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):  # type: ignore[no-untyped-def]
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (face data lives in ../shared/data beside the repo, for development and CI)")
    return path
