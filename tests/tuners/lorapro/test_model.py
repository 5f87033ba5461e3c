"""LoraProConfig validation and JSON round trip; LoraProModel builds LoRA-Pro layers that compute their own
adjusted gradients (scale read from the layer, rsLoRA included); save / reload keeps the type."""

from __future__ import annotations

import pytest
import torch

from peft import LoraProConfig, PeftConfig, PeftModel, get_peft_model
from peft.optimizers import LoraProAdamW
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lorapro import LoraProLayer
from peft.tuners.lorapro import math as lp
from peft.utils import PeftType
from tests.helpers.tiny_models import tiny_gpt2, tiny_llama, token_ids


@pytest.mark.parametrize("field, value, match", [
    ("mode", "paper", "mode='paper'"), ("x_mode", "symmetry", "x_mode='symmetry'"),
    ("damping", -1e-3, "damping=-0.001"), ("damping", True, "damping=True"),
])
def test_config_rejects_bad_options(field, value, match):
    with pytest.raises(ValueError, match=match):
        LoraProConfig(**{field: value})


def test_config_json_round_trip(tmp_path):
    config = LoraProConfig(r=4, mode="efficient", x_mode="symmetric", damping=1e-6, target_modules=["q_proj"])
    assert config.peft_type == PeftType.LORAPRO
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraProConfig)
    assert (loaded.mode, loaded.x_mode, loaded.damping) == ("efficient", "symmetric", 1e-6)


@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_layers_adjust_their_own_gradients(build, targets):
    model = get_peft_model(build(dtype=torch.float64),
                           LoraProConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=targets, damping=0.0,
                                         init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m, LoraProLayer) for m in layers)
    ids = token_ids(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers:
        assert layer.lorapro_scaling("default") == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(r)
        A, B = layer.lorapro_factors("default")
        gA, gB = layer.lorapro_adjusted_gradients("default", A.grad, B.grad)
        ref = lp.adjusted_gradients(A.detach(), B.detach(), A.grad, B.grad, 3.0, "sylvester", 0.0)
        torch.testing.assert_close(gA, ref[0])
        torch.testing.assert_close(gB, ref[1])


def test_saved_adapter_reloads_as_lorapro_and_trains(tmp_path):
    config = LoraProConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], mode="efficient")
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert isinstance(loaded.peft_config["default"], LoraProConfig)
    layers = [m for m in loaded.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.lorapro_options["default"].mode == "efficient" for m in layers)
    opt = LoraProAdamW(loaded, lr=1e-3)
    ids = token_ids(2, 8)
    loaded(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
