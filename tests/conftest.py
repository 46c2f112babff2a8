"""Test-wide settings: no network, no W&B uploads, small thread counts, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# OMP_NUM_THREADS=1 lets several test runs share the 2 cores without oversubscription.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path_factory, monkeypatch):
    """Every test writes W&B files under a temporary folder."""
    root = tmp_path_factory.mktemp("wandb")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(root))
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
