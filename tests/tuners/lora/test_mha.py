"""LoRA on `nn.MultiheadAttention` (float64): the forward against a reference attention holding the closed-form
weights `W_in + s B A` and `W_out + 2 s B_o A_o` (upstream PEFT 0.21.2's count, see `peft.tuners.lora.mha`), adapter
== merged == reloaded == merged-and-unloaded, unmerge restores the base, disabled == base, refusals, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import MultiheadAttention
from peft.tuners.lora.mha import OUT_PROJ_UPDATE_COUNT

D = torch.float64
E, HEADS = 8, 2


class _Net(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.lin = nn.Linear(E, 3)

    def forward(self, x, attn_mask=None):
        return self.lin(self.mha(x, x, x, attn_mask=attn_mask)[0])


def _build(seed: int = 0, batch_first: bool = True) -> tuple[_Net, dict]:
    torch.manual_seed(seed)
    net = _Net(batch_first).to(D)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def _fresh(state: dict, batch_first: bool = True) -> _Net:
    net = _Net(batch_first).to(D)
    net.load_state_dict(state)
    return net


def _peft(net: nn.Module, **kwargs):
    config = dict(r=4, lora_alpha=6, target_modules=["mha"], init_lora_weights=False)
    return get_peft_model(net, LoraConfig(**{**config, **kwargs}))


@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_matches_closed_form_weights(batch_first):
    net, state = _build(batch_first=batch_first)
    model = _peft(net)
    layer = model.base_model.model.mha
    assert isinstance(layer, MultiheadAttention) and OUT_PROJ_UPDATE_COUNT == 2
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = layer.get_base_layer().out_proj
    Ao, Bo = out.lora_A["default"].weight, out.lora_B["default"].weight
    assert A.shape == (4, E) and B.shape == (3 * E, 4) and Ao.shape == (4, E) and Bo.shape == (E, 4)
    s = 6 / 4
    ref = _fresh(state, batch_first).mha
    with torch.no_grad():
        ref.in_proj_weight += s * B @ A
        ref.out_proj.weight += 2 * s * Bo @ Ao
    x = torch.randn(2, 5, E, dtype=D) if batch_first else torch.randn(5, 2, E, dtype=D)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    for m in (None, mask):
        expected = ref(x, x, x, attn_mask=m)[0]
        torch.testing.assert_close(layer(x, x, x, attn_mask=m)[0], expected, atol=1e-12, rtol=0)
    assert (layer(x, x, x)[0] - _fresh(state, batch_first).mha(x, x, x)[0]).abs().max() > 1e-3


def test_adapter_equals_merged_equals_reloaded_and_unmerge_restores(tmp_path):
    net, state = _build()
    model = _peft(net, target_modules=["mha", "lin"])
    x = torch.randn(3, 4, E, dtype=D)
    base_y = _fresh(state)(x)
    y = model(x)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_y, atol=1e-12, rtol=0)
    layer = model.base_model.model.mha
    model.merge_adapter()
    assert layer.merged and layer.get_base_layer().out_proj.merged
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=0)
    with model.disable_adapter():  # disabling a merged layer unmerges it first
        torch.testing.assert_close(model(x), base_y, atol=1e-12, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().in_proj_weight, state["mha.in_proj_weight"], atol=1e-14, rtol=0)
    torch.testing.assert_close(layer.out_proj.weight, state["mha.out_proj.weight"], atol=1e-14, rtol=0)
    assert not layer.get_base_layer().in_proj_weight.requires_grad and not layer.out_proj.weight.requires_grad
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{m}.{f}.weight" for m in ("mha", "mha.base_layer.out_proj", "lin")
                    for f in ("lora_A", "lora_B")}
    reloaded = PeftModel.from_pretrained(_fresh(state), tmp_path)
    torch.testing.assert_close(reloaded(x), y, atol=1e-12, rtol=0)
    plain = reloaded.merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention
    assert isinstance(plain.mha.out_proj, nn.Linear) and not hasattr(plain.mha.out_proj, "lora_A")
    torch.testing.assert_close(plain(x), y, atol=1e-12, rtol=0)
    assert not any("lora" in k for k in plain.state_dict())


def test_unload_without_merge_gives_the_base():
    net, state = _build()
    model = _peft(net)
    x = torch.randn(2, 3, E, dtype=D)
    plain = model.unload()
    assert type(plain.mha) is nn.MultiheadAttention
    torch.testing.assert_close(plain(x), _fresh(state)(x), atol=1e-12, rtol=0)


def test_training_step_reaches_both_projections_and_leaves_base_frozen():
    net, state = _build()
    model = _peft(net)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{m}.{f}.default.weight" for m in ("mha", "mha.base_layer.out_proj")
                         for f in ("lora_A", "lora_B")}
    x, target = torch.randn(4, 5, E, dtype=D), torch.randn(4, 5, 3, dtype=D)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(3):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        for name, param in model.named_parameters():
            assert (param.grad is not None and param.grad.abs().sum() > 0) == (name in trainable), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base = model.base_model.model.mha.get_base_layer()
    assert torch.equal(base.in_proj_weight, state["mha.in_proj_weight"])
    assert torch.equal(base.out_proj.get_base_layer().weight, state["mha.out_proj.weight"])


def test_default_init_is_identity_on_both_projections():
    net, state = _build()
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["mha"]))
    out = model.base_model.model.mha.get_base_layer().out_proj
    assert not out.fan_in_fan_out and torch.equal(out.lora_B["default"].weight, torch.zeros(E, 4, dtype=D))
    x = torch.randn(2, 3, E, dtype=D)
    torch.testing.assert_close(model(x), _fresh(state)(x), atol=1e-12, rtol=0)


def test_two_adapters_switch_and_delete():
    net, state = _build()
    model = _peft(net)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    x = torch.randn(2, 3, E, dtype=D)
    y_default = model(x)
    model.set_adapter("other")
    layer = model.base_model.model.mha
    assert layer.active_adapters == ["other"] and layer.get_base_layer().out_proj.active_adapters == ["other"]
    y_other = model(x)
    assert (y_default - y_other).abs().max() > 1e-4
    model.delete_adapter("other")
    assert "other" not in layer.lora_A and "other" not in layer.get_base_layer().out_proj.lora_A
    torch.testing.assert_close(model(x), y_default, atol=1e-12, rtol=0)


def test_refusals():
    with pytest.raises(ValueError, match="kdim"):
        get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="use_dora"):
        MultiheadAttention(nn.MultiheadAttention(8, 2), "default", r=2, use_dora=True)


def test_layer_forwards_base_attributes():
    layer = MultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True), "default", r=2)
    assert layer.batch_first and layer.embed_dim == 8 and layer.num_heads == 2
    assert not layer._qkv_same_embed_dim  # while the adapter is active (see the next test)
    layer.enable_adapters(False)
    assert layer._qkv_same_embed_dim
    assert layer.in_proj_weight is layer.get_base_layer().in_proj_weight
    assert type(layer.out_proj) is not type(layer.get_base_layer().out_proj)  # the plain Linear, not its wrapper


def test_transformer_encoder_layer_inference_fast_path_sees_the_adapter():
    """`nn.TransformerEncoderLayer` in eval mode computes attention from `in_proj_weight` itself (a fused kernel)
    unless `self_attn._qkv_same_embed_dim` is False: the adapter must not be skipped there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["self_attn"], init_lora_weights=False)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            base_y = model(x)
        model.merge_adapter()  # merged: the fast path runs on the merged weights
        merged_y = model(x)
    assert (y - base_y).abs().max() > 1e-3
    torch.testing.assert_close(merged_y, y, atol=1e-5, rtol=0)
