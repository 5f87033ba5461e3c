"""Hot-swapping: the swapped model equals the freshly loaded one, in place; incompatible adapters are refused."""

import copy

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    padded,
    prepare_model_for_compiled_hotswap,
)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 5, bias=False)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, img=None):
        out = self.lin1(self.relu(self.lin0(x)))
        return out if img is None else (out, self.conv(img))


def _base():
    torch.manual_seed(0)
    return MLP()


def _save(tmp_path, name, seed, **kwargs):
    config = LoraConfig(init_lora_weights=False, **{"target_modules": ["lin0", "lin1"], **kwargs})
    base = _base()
    torch.manual_seed(seed)  # after the base: the adapters differ by seed
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


X = torch.randn(4, 10)
IMG = torch.randn(2, 3, 6, 6)


def _out(model):
    with torch.no_grad():
        out = model(X, IMG)
    return torch.cat([out[0].flatten(), out[1].flatten()])


def test_padded_keeps_product():
    A, B = torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    A4, B4 = padded(A, 4, 0), padded(B, 4, 1)
    assert A4.shape == (4, 5) and B4.shape == (3, 4)
    torch.testing.assert_close(B4 @ A4, B @ A, rtol=0, atol=0)
    with pytest.raises(ValueError, match="original rank is larger"):
        padded(A, 1, 0)


@pytest.mark.parametrize("second", [dict(), dict(r=12, lora_alpha=16), dict(r=4, lora_alpha=3),
                                    dict(target_modules=["lin0"])])
def test_swap_equals_fresh_load(tmp_path, second):
    path0 = _save(tmp_path, "a0", 1, target_modules=["lin0", "lin1", "conv"])
    path1 = _save(tmp_path, "a1", 2, **{"target_modules": ["lin0", "lin1", "conv"], **second})
    expected = _out(PeftModel.from_pretrained(_base(), path1))
    model = PeftModel.from_pretrained(_base(), path0)
    before = _out(model)
    if second.get("r", 8) > 8:  # a larger rank is swapped into zero-padded factors
        prepare_model_for_compiled_hotswap(model, target_rank=second["r"])
    params = {n: p for n, p in model.named_parameters()}
    hotswap_adapter(model, path1, adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(_out(model), expected)
    assert not torch.allclose(before, expected)
    assert all(p is params[n] for n, p in model.named_parameters())  # same parameter objects


def test_prepare_keeps_output_and_makes_tensor_scales(tmp_path):
    model = PeftModel.from_pretrained(_base(), _save(tmp_path, "a0", 1, target_modules=["lin0", "conv"]))
    before = _out(model)
    prepare_model_for_compiled_hotswap(model, target_rank=11, config=model.peft_config)
    assert isinstance(model.base_model.model.lin0.scaling["default"], torch.Tensor)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (11, 10)
    assert model.base_model.model.conv.lora_B["default"].weight.shape == (4, 11, 1, 1)
    assert model.peft_config["default"].r == 11
    torch.testing.assert_close(_out(model), before)
    with pytest.raises(ValueError, match="original rank is larger"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match="No adapter layers"):
        prepare_model_for_compiled_hotswap(_base())


def test_mismatches_raise_and_leave_model(tmp_path):
    path0 = _save(tmp_path, "a0", 1, target_modules=["lin0"])
    model = PeftModel.from_pretrained(_base(), path0)
    before = copy.deepcopy(model.state_dict())
    extra = _save(tmp_path, "extra", 3, target_modules=["lin0", "lin1"])
    with pytest.raises(RuntimeError, match="unexpected keys found: .*lin1"):
        hotswap_adapter(model, extra, adapter_name="default", torch_device="cpu")
    other = _save(tmp_path, "drop", 3, target_modules=["lin0"], lora_dropout=0.1)
    with pytest.raises(ValueError, match="Configs are incompatible: for lora_dropout"):
        hotswap_adapter(model, other, adapter_name="default", torch_device="cpu")
    bigger = _save(tmp_path, "big", 3, target_modules=["lin0"], r=16)
    sd = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight"): v
          for k, v in __import__("peft").load_peft_weights(str(bigger)).items()}
    sd = {k: v[:, :3] if "lora_A" in k else v for k, v in sd.items()}  # wrong in_features
    with pytest.raises(ValueError, match="Incompatible shapes"):
        hotswap_adapter_from_state_dict(model, sd, "default", model.peft_config["default"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_target_refused(tmp_path):
    model = PeftModel.from_pretrained(_base(), _save(tmp_path, "a0", 1))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, _save(tmp_path, "a1", 2), adapter_name="default", torch_device="cpu")
