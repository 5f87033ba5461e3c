"""get_layer_status / get_model_status: per-layer records and the model summary with "irregular" values."""

import pytest
import torch
from torch import nn

import peft
from peft import LoraConfig, get_peft_model
from peft.peft_model import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(4, 5)
        self.lin1 = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin1(self.lin0(x))


def _model():
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin1"]))
    return model


def test_exports():
    assert peft.get_layer_status is get_layer_status and peft.get_model_status is get_model_status
    assert peft.TunerLayerStatus is TunerLayerStatus and peft.TunerModelStatus is TunerModelStatus


def test_layer_status_fields():
    model = _model()
    status = model.get_layer_status()
    assert [s.name for s in status] == ["model.lin0", "model.lin1"]
    assert [s.module_type for s in status] == ["lora.Linear", "lora.Linear"]
    assert status[0].available_adapters == ["default"] and status[1].available_adapters == ["default", "other"]
    assert status[1].requires_grad == {"default": True, "other": False}
    assert status[1].devices == {"default": ["cpu"], "other": ["cpu"]}
    assert all(s.enabled and s.active_adapters == ["default"] and s.merged_adapters == [] for s in status)
    assert all(s.quantization_backend is None for s in status)


def test_model_status_regular_and_irregular():
    model = _model()
    st = model.get_model_status()
    assert (st.base_model_type, st.adapter_model_type, st.peft_types) == ("Net", "LoraModel",
                                                                        {"default": "LORA", "other": "LORA"})
    assert st.num_adapter_layers == 2 and st.enabled is True and st.merged_adapters == []
    assert st.available_adapters == ["default", "other"]
    assert st.requires_grad == {"default": True, "other": False}
    assert (st.trainable_params, st.total_params) == model.get_nb_trainable_parameters()
    model.base_model.model.lin0.enable_adapters(False)
    model.base_model.model.lin0.merge(adapter_names=["default"])
    model.base_model.model.lin1.set_adapter("other")  # freezes default there
    model.base_model.model.lin1.lora_A["default"].weight.requires_grad_(True)
    st = model.get_model_status()
    assert st.enabled == "irregular" and st.active_adapters == "irregular"
    assert st.merged_adapters == "irregular"  # default merged on lin0, not on lin1
    assert st.requires_grad["default"] == "irregular"
    assert model.get_layer_status()[1].requires_grad["default"] == "irregular"


def test_plain_module_and_no_adapter():
    model = _model()
    inner = model.base_model.model
    st = get_model_status(inner)
    assert st.adapter_model_type == "None" and st.peft_types == {} and st.num_adapter_layers == 2
    with pytest.raises(ValueError, match="No adapter layers"):
        get_layer_status(Net())


def test_modules_to_save_counted():
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"]))
    st = model.get_model_status()
    assert st.num_adapter_layers == 2 and st.requires_grad == {"default": True}
    assert st.available_adapters == ["default"] and st.devices == {"default": ["cpu"]}
    x = torch.randn(2, 4)
    assert model(x).shape == (2, 3)
