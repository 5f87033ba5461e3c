"""Test-wide set-up: offline hub, fixed seeds."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so a failure reproduces when run alone."""
    torch.manual_seed(0)
    yield
