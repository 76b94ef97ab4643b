"""Shared test helpers: the repository root on sys.path and the official reference fixture."""
import json
import os
import sys

import pytest
import torch
import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# No tqdm monitor thread in the test process: tests that run a script's main() in-process keep bars open for more than
# its 10 s interval, and a child the fault tests fork while that thread holds tqdm's lock waits on it for ever.
tqdm.tqdm.monitor_interval = 0
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
