"""LoHa on tiny float64 models: init, adapter == merged == reloaded, disabled == base, several adapters, training."""

from __future__ import annotations

import pytest

from peft import LoHaConfig
from tests.tuners.loha import lycoris_checks as checks

SETUPS = {
    "linear": ("mlp", dict(r=4, alpha=8, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})),
    "conv": ("conv", dict(r=3, alpha=6, target_modules=["conv0", "conv1", "conv2", "lin"])),
    "conv_effective": ("conv", dict(r=2, alpha=3, use_effective_conv2d=True, target_modules=["conv0", "conv1"])),
    "conv1d_effective": ("conv1d", dict(r=2, alpha=4, use_effective_conv2d=True, target_modules=["c0", "c1"])),
}
IDS = list(SETUPS)


@pytest.mark.parametrize("setup", IDS)
def test_init_preserves_output(setup):
    kind, kwargs = SETUPS[setup]
    checks.check_init_preserves_output(kind, LoHaConfig, **kwargs)


@pytest.mark.parametrize("setup", IDS)
def test_adapter_merged_reloaded(setup, tmp_path):
    kind, kwargs = SETUPS[setup]
    checks.check_adapter_merged_reloaded(kind, LoHaConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("setup", ["linear", "conv_effective"])
def test_multiple_adapters(setup, tmp_path):
    kind, kwargs = SETUPS[setup]
    checks.check_multiple_adapters(kind, LoHaConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("setup", ["linear", "conv_effective"])
def test_training_reduces_loss(setup):
    kind, kwargs = SETUPS[setup]
    checks.check_training_reduces_loss(kind, LoHaConfig, **kwargs)


def test_safe_merge_refuses_nan():
    checks.check_safe_merge_refuses_nan(*SETUPS["linear"][:1], LoHaConfig, **SETUPS["linear"][1])


def test_dropouts():
    checks.check_dropouts("mlp", LoHaConfig, **SETUPS["linear"][1])


def test_unsupported_target_leaves_model_unchanged():
    checks.check_unsupported_target_leaves_model(LoHaConfig)
