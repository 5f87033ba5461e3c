"""Behaviour aligned with upstream PEFT 0.21.2's tests: modules_to_save wrapper state, refusals."""

import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        self.lin1 = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin1(self.lin0(x))


def _model(**kwargs):
    torch.manual_seed(0)
    return get_peft_model(TwoLinear(), LoraConfig(target_modules=["lin0"], **kwargs))


def test_wrapper_active_adapters_only_lists_adapters_with_a_copy():
    model = _model()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    wrapper = model.base_model.model.lin1
    x = torch.randn(2, 4)
    assert wrapper.active_adapters == [] and wrapper.adapter_layer_names == ("modules_to_save",)
    torch.testing.assert_close(wrapper(x), wrapper.original_module(x))
    model.set_adapter("other")
    assert wrapper.active_adapters == ["other"] and wrapper.modules_to_save["other"].weight.requires_grad
    model.set_adapter("default")
    assert wrapper.active_adapters == [] and not wrapper.modules_to_save["other"].weight.requires_grad


def test_wrapper_attribute_of_missing_active_copy_raises():
    model = _model(modules_to_save=["lin1"])
    wrapper = model.base_model.model.lin1
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    wrapper._active_adapter = "does-not-exist"
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        getattr(wrapper, "weight")  # noqa: B009


def test_modules_to_save_matching_inside_a_lora_layer_is_refused_without_change():
    model = _model()
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match="child of .*adapter name, 'lin1'"):
        model.add_adapter("lin1", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    assert sorted(model.state_dict()) == keys and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pissa_conversion_with_rslora_and_pattern_is_refused(tmp_path, pattern):
    config = LoraConfig(init_lora_weights="pissa", target_modules=["lin0"], r=2, use_rslora=True,
                        **{pattern: {"lin0": 1}})
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), config)
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unmatched_target_parameters_warn_with_matched_modules_and_raise_without():
    with pytest.warns(RuntimeWarning, match=r"target_parameters=\['foobar.weight'\] were set but no parameter"):
        model = get_peft_model(TwoLinear(), LoraConfig(target_modules=["lin0"], target_parameters=["foobar.weight"]))
    assert model.targeted_module_names == ["lin0"]
    base = TwoLinear()
    with pytest.raises(ValueError, match="No `target_modules` passed but also no `target_parameters` found"):
        get_peft_model(base, LoraConfig(target_modules=[], target_parameters=["foobar.weight"]))
    assert isinstance(base.lin0, nn.Linear) and type(base.lin0) is nn.Linear
