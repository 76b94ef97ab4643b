"""Shared test helpers: the repository root on sys.path and the official reference fixture."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "dit_official_reference.safetensors")


@pytest.fixture(scope="session")
def reference():
    """Tensors and the DiT config of reference outputs computed by running the official DiT code."""
    if not os.path.isfile(FIXTURE):
        pytest.fail(f"reference fixture missing: {FIXTURE}")
    from safetensors import safe_open
    with safe_open(FIXTURE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["config"])
    return tensors, config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
