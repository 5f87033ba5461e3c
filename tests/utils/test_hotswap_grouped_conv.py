"""Hot-swapping LoRA on a grouped Conv2d: padding keeps each group's rank block with its group."""

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.conv_math import conv_delta_kernel
from peft.utils.hotswap import hotswap_adapter, padded_grouped, prepare_model_for_compiled_hotswap


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, kernel_size=3, groups=2)

    def forward(self, x):
        return self.conv(x)


def _base():
    torch.manual_seed(0)
    return GroupedConv()


def test_padded_grouped_keeps_the_delta_kernel():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 3, 3, generator=gen, dtype=torch.float64)  # r=4, 2 groups
    b = torch.randn(6, 2, 1, 1, generator=gen, dtype=torch.float64)  # (c_out, r / groups)
    a8 = padded_grouped(a, 8, 0, groups=2)
    b8 = torch.cat([b, torch.zeros(6, 2, 1, 1, dtype=torch.float64)], 1)
    assert a8.shape == (8, 6, 3, 3)
    assert torch.equal(a8[0:2], a[0:2]) and torch.equal(a8[4:6], a[2:4]) and not a8[2:4].any()
    torch.testing.assert_close(conv_delta_kernel(a8, b8, 0.5, 2), conv_delta_kernel(a, b, 0.5, 2), rtol=0, atol=1e-12)
    # plain (ungrouped) padding would mix group 1's rows into group 0's block: a different kernel
    plain = torch.cat([a, torch.zeros(4, 6, 3, 3, dtype=torch.float64)], 0)
    assert not torch.allclose(conv_delta_kernel(plain, b8, 0.5, 2), conv_delta_kernel(a, b, 0.5, 2))


def test_padded_grouped_rejects_indivisible_rank():
    with pytest.raises(ValueError, match="groups=2"):
        padded_grouped(torch.zeros(4, 3), 5, 0, groups=2)


def test_prepare_rejects_target_rank_not_divisible_by_groups_without_change():
    model = get_peft_model(_base(), LoraConfig(target_modules=["conv"], r=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="groups=2 to target rank 3"):
        prepare_model_for_compiled_hotswap(model, target_rank=3)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("ranks", [(2, 4), (4, 2)])
def test_hotswap_grouped_conv_different_ranks(tmp_path, ranks):
    x = torch.rand(1, 4, 8, 8)
    outputs = []
    for i, r in enumerate(ranks):
        torch.manual_seed(i)
        model = get_peft_model(_base(), LoraConfig(target_modules=["conv"], r=r, init_lora_weights=False)).eval()
        with torch.no_grad():
            outputs.append(model(x))
        model.save_pretrained(tmp_path / f"a{i}")
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    model = PeftModel.from_pretrained(_base(), tmp_path / "a0").eval()
    prepare_model_for_compiled_hotswap(model, target_rank=max(ranks))
    with torch.no_grad():
        torch.testing.assert_close(model(x), outputs[0], rtol=1e-5, atol=1e-5)
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        torch.testing.assert_close(model(x), outputs[1], rtol=1e-5, atol=1e-5)
        hotswap_adapter(model, tmp_path / "a0", adapter_name="default")
        torch.testing.assert_close(model(x), outputs[0], rtol=1e-5, atol=1e-5)
