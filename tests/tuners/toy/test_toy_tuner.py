"""The generic framework, measured with a tuner type it has never seen (tests/tuners/toy/toy_tuner.py: one file,
one registration call): save, load, freezing, merging, `modules_to_save` and the transformers-facing functions
must work for it without any code that names it. These are the failures a type outside LoRA met before: an empty
weights file, init values loaded silently instead of the trained ones, inference adapters left trainable."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from peft.registry import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils.peft_types import PeftType
from tests.tuners.toy.toy_tuner import ToyConfig, ToyLayer, ToyModel

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.embed(x)))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


X = torch.randn(5, 6, dtype=torch.float64)


def _trained(model: PeftModel, adapter: str = "default", seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ToyLayer) and adapter in module.toy_scale:
                scale = module.toy_scale[adapter]
                scale.copy_(1 + 0.5 * torch.randn(scale.shape, generator=gen, dtype=scale.dtype))


def test_registered_with_one_call():
    assert PeftType("TOY") is PeftType.TOY
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TOY] == "toy_"
    assert ToyConfig(target_modules=["hidden"]).peft_type == PeftType.TOY


def test_init_is_identity_only_adapter_trains_and_disable_is_base():
    base = _net()
    expected = base(X)
    model = get_peft_model(base, ToyConfig(target_modules=["embed", "hidden"]))
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.embed.toy_scale.default", "base_model.model.hidden.toy_scale.default"}
    _trained(model)
    assert (model(X) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


def test_save_writes_the_trained_vectors_and_load_restores_them(tmp_path):
    model = get_peft_model(_net(), ToyConfig(target_modules=["embed", "hidden"]))
    _trained(model)
    expected = model(X)
    model.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(weights) == ["base_model.model.embed.toy_scale", "base_model.model.hidden.toy_scale"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "TOY"
    assert isinstance(PeftConfig.from_pretrained(str(tmp_path)), ToyConfig)

    loaded = PeftModel.from_pretrained(_net(), str(tmp_path))
    torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # an inference adapter is frozen
    trainable = PeftModel.from_pretrained(_net(), str(tmp_path), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        "base_model.model.embed.toy_scale.default", "base_model.model.hidden.toy_scale.default"}


def test_a_file_missing_a_vector_is_refused_and_leaves_the_model_unchanged(tmp_path):
    model = get_peft_model(_net(), ToyConfig(target_modules=["embed", "hidden"]))
    _trained(model)
    model.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    del weights["base_model.model.hidden.toy_scale"]
    other = get_peft_model(_net(), ToyConfig(target_modules=["embed", "hidden"]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    from peft import set_peft_model_state_dict

    with pytest.raises(ValueError, match="missing keys"):
        set_peft_model_state_dict(other, weights)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_equals_adapter_and_unmerge_restores_base():
    base = _net()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ToyConfig(target_modules=["hidden", "out"]))
    _trained(model)
    expected = model(X)
    model.merge_adapter()
    torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ToyLayer) for m in merged.modules())
    torch.testing.assert_close(merged(X), expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(merged.hidden.weight, reference["hidden.weight"])


def test_two_adapters_set_delete_and_load_adapter(tmp_path):
    model = get_peft_model(_net(), ToyConfig(target_modules=["hidden"]))
    _trained(model, "default", seed=1)
    out_default = model(X)
    model.add_adapter("other", ToyConfig(target_modules=["hidden"]))
    _trained(model, "other", seed=2)
    model.set_adapter("other")
    out_other = model(X)
    assert (out_other - out_default).abs().max() > 1e-3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"base_model.model.hidden.toy_scale.other"}
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")

    loaded = PeftModel.from_pretrained(_net(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    torch.testing.assert_close(loaded(X), out_default, rtol=0, atol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(X), out_other, rtol=0, atol=0)
    loaded.delete_adapter("other")
    assert "other" not in loaded.base_model.model.hidden.toy_scale
    torch.testing.assert_close(loaded(X), out_default, rtol=0, atol=0)


def test_modules_to_save_round_trip(tmp_path):
    model = get_peft_model(_net(), ToyConfig(target_modules=["hidden"], modules_to_save=["out"]))
    _trained(model)
    with torch.no_grad():
        model.base_model.model.out.modules_to_save["default"].weight.add_(0.25)
    expected = model(X)
    model.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(weights) == {"base_model.model.hidden.toy_scale", "base_model.model.out.weight",
                            "base_model.model.out.bias"}
    torch.testing.assert_close(PeftModel.from_pretrained(_net(), str(tmp_path))(X), expected, rtol=0, atol=0)


def test_plain_model_functions_transformers_calls():
    """What transformers' integration calls on a plain model: inject, then the state dict of the adapter."""
    model = inject_adapter_in_model(ToyConfig(target_modules=["hidden"]), _net())
    assert isinstance(model.hidden, ToyLayer)
    assert list(get_peft_model_state_dict(model)) == ["hidden.toy_scale"]


def test_tuner_model_class_is_the_registered_one():
    model = get_peft_model(_net(), ToyConfig(target_modules=["hidden"]))
    assert type(model.base_model) is ToyModel
