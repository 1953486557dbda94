"""Shared fixtures: the real data folder beside the checkout, and an isolated MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or MEDROBUST_SHARED_DATA."""
    env = os.environ.get("MEDROBUST_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (tests on real images need ../shared/data)")
    return path


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh local SQLite MLflow store for one test (the real MLflow, no mocks)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _one_thread_and_clean_mlflow_env(monkeypatch):
    """Tiny tensors run fastest on one thread on a 2-core machine; no test leaks a tracking URI to the next."""
    import mlflow
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(None)
