"""LoKr on tiny float64 models: init, adapter == merged == reloaded, disabled == base, several adapters, training."""

from __future__ import annotations

import pytest

from peft import LoKrConfig
from tests.tuners.loha import lycoris_checks as checks

SETUPS = {
    "linear": ("mlp", dict(r=2, alpha=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 1})),
    "linear_both_lycoris": ("mlp", dict(r=2, alpha=4, decompose_both=True, init_weights="lycoris",
                                        target_modules=["lin0", "lin1", "head"])),
    "linear_factor": ("mlp", dict(r=8, alpha=8, decompose_factor=4, target_modules=["lin0", "lin1"])),
    "conv": ("conv", dict(r=1, alpha=2, target_modules=["conv0", "conv1", "conv2", "lin"])),
    "conv_effective": ("conv", dict(r=1, alpha=3, use_effective_conv2d=True, target_modules=["conv0", "conv1"])),
    "conv_full": ("conv", dict(r=4, alpha=2, target_modules=["conv0", "conv1", "conv2"])),
    "conv1d_effective": ("conv1d", dict(r=1, alpha=2, use_effective_conv2d=True, target_modules=["c0", "c1"])),
    "conv1d_full": ("conv1d", dict(r=4, alpha=2, target_modules=["c0", "c1"])),
}
IDS = list(SETUPS)


@pytest.mark.parametrize("setup", IDS)
def test_init_preserves_output(setup):
    kind, kwargs = SETUPS[setup]
    checks.check_init_preserves_output(kind, LoKrConfig, **kwargs)


@pytest.mark.parametrize("setup", IDS)
def test_adapter_merged_reloaded(setup, tmp_path):
    kind, kwargs = SETUPS[setup]
    checks.check_adapter_merged_reloaded(kind, LoKrConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("setup", ["linear", "conv_effective"])
def test_multiple_adapters(setup, tmp_path):
    kind, kwargs = SETUPS[setup]
    checks.check_multiple_adapters(kind, LoKrConfig, tmp_path, **kwargs)


@pytest.mark.parametrize("setup", ["linear_factor", "conv_full"])
def test_training_reduces_loss(setup):
    kind, kwargs = SETUPS[setup]
    checks.check_training_reduces_loss(kind, LoKrConfig, **kwargs)


def test_safe_merge_refuses_nan():
    checks.check_safe_merge_refuses_nan("mlp", LoKrConfig, **SETUPS["linear"][1])


@pytest.mark.parametrize("scale", [False, True])
def test_dropouts(scale):
    checks.check_dropouts("mlp", LoKrConfig, **dict(SETUPS["linear"][1], rank_dropout_scale=scale))


def test_unsupported_target_leaves_model_unchanged():
    checks.check_unsupported_target_leaves_model(LoKrConfig)
