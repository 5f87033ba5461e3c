"""`lora_dropout > 0` (issue 12, item 13): A and B then see the dropped-out input, so their gradients are
`s B^T g_D` and `s g_D A^T` for `g_D = sum_i delta_i D(x_i)^T`, not for `g = dL/dW = sum_i delta_i x_i^T`; LoRA-Pro
projects g_D (docs/lorapro.md, "LoRA dropout"). Building a LoRA-Pro optimizer on such layers warns once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, LoraProConfig, get_peft_model
from peft.optimizers import AdamWLoRAPro, LoraProAdamW, register_lorapro_adjustment
from tests.optimizers.test_lorapro import Net


def _model(config_cls=LoraConfig, dropout=0.25):
    torch.manual_seed(0)
    return get_peft_model(Net(), config_cls(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["fc1", "fc2"],
                                            init_lora_weights=False))


def _build_all(model):
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    return [lambda: LoraProAdamW(model), lambda: LoraProAdamW([{"params": lora}]), lambda: AdamWLoRAPro(lora),
            lambda: register_lorapro_adjustment(torch.optim.SGD(lora, lr=0.1), model)]


@pytest.mark.parametrize("config_cls", [LoraConfig, LoraProConfig])
def test_dropout_warns_once_per_optimizer(config_cls):
    model = _model(config_cls)
    for build in _build_all(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build()
        dropout = [w for w in caught if "lora_dropout > 0" in str(w.message)]
        assert len(dropout) == 1, [str(w.message) for w in caught]  # one warning for the two layers
        assert "2 of the 2 LoRA layers" in str(dropout[0].message) and "p = 0.25" in str(dropout[0].message)
        assert dropout[0].filename == __file__  # points at the user's line
    for build in _build_all(_model(config_cls, dropout=0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build()


def test_dropout_gradients_are_those_of_the_dropped_input():
    """What docs/lorapro.md says LoRA-Pro projects under dropout: one g_D serves both factors, and it is not g."""
    model = _model()
    model.train()
    layer = model.base_model.model.fc1
    seen = {}
    layer.lora_dropout["default"].register_forward_hook(lambda mod, args, out: seen.update(x=args[0], xd=out))

    def keep_output_grad(mod, args, out) -> None:
        out.register_hook(lambda grad: seen.update(delta=grad))

    layer.register_forward_hook(keep_output_grad)
    torch.manual_seed(1)
    model(torch.randn(16, 6)).square().mean().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    g_D, g = seen["delta"].T @ seen["xd"], seen["delta"].T @ seen["x"]  # (m, n)
    torch.testing.assert_close(A.grad, s * B.detach().T @ g_D)
    torch.testing.assert_close(B.grad, s * g_D @ A.detach().T)
    assert not torch.allclose(A.grad, s * B.detach().T @ g, atol=1e-4)  # not the gradient of W itself
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
