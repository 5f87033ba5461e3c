"""`peft.utils.integrations`: init_empty_weights / skip_init_on_device."""

import torch
from torch import nn

from peft.utils.integrations import init_empty_weights, skip_init_on_device


def _devices(module):
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_parameters_on_meta_and_restored():
    original = nn.Module.register_parameter
    with init_empty_weights():
        lin = nn.Linear(3, 4)
        norm = nn.BatchNorm1d(4)
    assert _devices(lin) == {"meta"}
    assert {p.device.type for p in norm.parameters()} == {"meta"}
    assert {b.device.type for b in norm.buffers()} == {"cpu"}  # buffers untouched by default
    assert lin.weight.requires_grad
    assert nn.Module.register_parameter is original
    assert _devices(nn.Linear(3, 4)) == {"cpu"}


def test_include_buffers_and_factories():
    original = torch.zeros
    with init_empty_weights(include_buffers=True):
        norm = nn.BatchNorm1d(4)
        made = torch.zeros(2)
    assert _devices(norm) == {"meta"} and made.device.type == "meta"
    assert torch.zeros is original and torch.zeros(1).device.type == "cpu"


def test_skip_nested_and_restored_on_error():
    @skip_init_on_device
    def outer():
        @skip_init_on_device
        def inner():
            return nn.Linear(2, 2)

        return inner(), nn.Linear(2, 2)

    with init_empty_weights():
        a, b = outer()
        c = nn.Linear(2, 2)
    assert _devices(a) == _devices(b) == {"cpu"} and _devices(c) == {"meta"}

    @skip_init_on_device
    def fails():
        raise ValueError("x")

    with init_empty_weights():
        try:
            fails()
        except ValueError:
            pass
        assert _devices(nn.Linear(2, 2)) == {"meta"}  # the skip ended with the failing call


def test_quantization_backend_names_reach_layer_status():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.quantization_utils import Bnb4bitBackend, Bnb8bitBackend

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    model = get_peft_model(model, LoraConfig(target_modules=["0", "1"]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].quantization_backend = Bnb8bitBackend()
    layers[1].quantization_backend = Bnb4bitBackend()
    assert [s.quantization_backend for s in model.get_layer_status()] == ["bnb 8bit", "bnb 4bit"]
    assert model.get_model_status().quantization_backend == "irregular"
