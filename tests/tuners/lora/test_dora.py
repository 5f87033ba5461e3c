"""DoRA (`use_dora=True`): the math in float64 against closed forms, and the layer invariants (adapter == merged ==
reloaded, unmerge restores the base, disabled == base, dropout formula, training moves the magnitude)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import dora
from peft.utils.save_and_load import get_peft_model_state_dict

F64 = torch.float64


def test_channel_norm_closed_form():
    W = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    dW = torch.tensor([[0.0, 4.0], [0.0, 0.0], [1.0, -1.0]], dtype=F64)
    expected = torch.tensor([5.0, 1.0, 2.0], dtype=F64)  # ||(3,4)||, ||(0,1)||, ||(2,0)||
    torch.testing.assert_close(dora.channel_norm(W, dW), expected)
    kernel = torch.ones(2, 3, 2, 2, dtype=F64)  # conv: norm over in-channels and kernel
    expected = torch.full((2,), 12**0.5, dtype=F64)
    torch.testing.assert_close(dora.channel_norm(kernel, torch.zeros_like(kernel)), expected)


def test_merged_weight_forward_equals_dora_forward():
    """`f (W + dW) x + b` with `f = m / ||W + dW||_c` equals the unmerged form `base(x) + (f - 1) W x + f dW x`."""
    torch.manual_seed(0)
    W, dW, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)
    m, x = torch.rand(4, dtype=F64) + 0.5, torch.randn(5, 3, dtype=F64)
    norm = torch.sqrt(((W + dW) ** 2).sum(1))
    merged = dora.dora_weight(W, dW, m, norm)
    torch.testing.assert_close(merged, (m / norm)[:, None] * (W + dW))
    f = dora.dora_factor(m, norm)
    unmerged = dora.dora_output(x @ W.T + b, x @ W.T, x @ dW.T, f, channel_dim=-1)
    torch.testing.assert_close(unmerged, x @ merged.T + b)
    torch.testing.assert_close(dora.undo_dora_weight(merged, dW, m, norm), W)
    # with m = ||W + dW||_c (the init) DoRA is plain LoRA
    torch.testing.assert_close(dora.dora_weight(W, dW, norm, norm), W + dW)


def test_base_weight_before_merges_inverts_a_chain():
    torch.manual_seed(1)
    W0 = torch.randn(3, 5, dtype=F64)
    d1, d2, m2 = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64), torch.rand(3, dtype=F64) + 1
    n2 = dora.channel_norm(W0, d2)
    W2 = dora.dora_weight(W0 + d1, d2, m2, n2)
    torch.testing.assert_close(dora.base_weight_before_merges(W2, [(d2, m2, n2), (d1, None, None)]), W0)


class Net(nn.Module):
    def __init__(self, fan_in_fan_out: bool = False):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin0 = nn.Linear(6, 7)
        self.lin1 = nn.Linear(7, 5, bias=False)
        self.conv = nn.Conv1d(5, 4, 3, padding=1)

    def forward(self, ids):
        h = self.lin1(torch.tanh(self.lin0(self.emb(ids))))  # (N, L, 5)
        return self.conv(h.transpose(1, 2))


TARGETS = ["emb", "lin0", "lin1", "conv"]


def _model(seed=0, **config):
    torch.manual_seed(seed)
    base = Net().to(F64)
    kwargs = {"target_modules": TARGETS, "use_dora": True, "init_lora_weights": False, "r": 3, "lora_alpha": 5}
    kwargs.update(config)
    return base, get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))


def _ids():
    return torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(5))


def _closed_form_linear(layer, x):
    """DoRA output of a Linear layer from its parameters: `m / ||W + s B A||_c * (W + s B A) x + b`."""
    base, name = layer.base_layer, "default"
    dW = layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
    Wp = base.weight + dW
    Wd = (layer.lora_magnitude_vector[name].weight / Wp.norm(dim=1))[:, None] * Wp
    return x @ Wd.T + (0 if base.bias is None else base.bias)


def test_layer_matches_closed_form_and_init_equals_lora():
    base, model = _model()
    x = torch.randn(3, 6, dtype=F64)
    layer = model.base_model.model.lin0
    torch.testing.assert_close(layer(x), _closed_form_linear(layer, x))
    # at init m = ||W + s B A||_c, so the DoRA layer equals the LoRA layer
    lora_out = layer.base_layer(x) + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](x))
    torch.testing.assert_close(layer(x), lora_out)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 2.0, 7, dtype=F64))
    torch.testing.assert_close(layer(x), _closed_form_linear(layer, x))
    assert not torch.allclose(layer(x), lora_out)


def test_embedding_magnitude_is_per_embedding_dim():
    _, model = _model()
    emb = model.base_model.model.emb
    E = emb.base_layer.weight + emb.scaling["default"] * (emb.lora_embedding_B["default"] @
                                                          emb.lora_embedding_A["default"]).T
    torch.testing.assert_close(emb.lora_magnitude_vector["default"].weight, E.norm(dim=0))  # (6,) over the vocab
    with torch.no_grad():
        emb.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 2.0, 6, dtype=F64))
    ids = _ids()
    expected = ((emb.lora_magnitude_vector["default"].weight / E.norm(dim=0)) * E)[ids]
    torch.testing.assert_close(emb(ids), expected)


def _perturb_magnitudes(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g, dtype=param.dtype))


def test_adapter_equals_merged_equals_reloaded_and_unmerge_restores(tmp_path):
    base, model = _model()
    _perturb_magnitudes(model)
    model.eval()
    ids = _ids()
    base_out, out = base(ids), model(ids)
    assert not torch.allclose(out, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids), base_out)
    model.merge_adapter()
    torch.testing.assert_close(model(ids), out)
    model.unmerge_adapter()
    for name, param in base.named_parameters():
        torch.testing.assert_close(model.get_base_model().get_parameter(_wrapped(name)), param, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids), out)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    reloaded.eval()
    torch.testing.assert_close(reloaded(ids), out)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(ids), out)


def _wrapped(param_name: str) -> str:
    """`lin0.weight` -> the parameter path inside the PEFT-wrapped model (`lin0.base_layer.weight`)."""
    module, attr = param_name.rsplit(".", 1)
    return f"{module}.base_layer.{attr}"


def test_saved_keys_match_upstream_format():
    _, model = _model()
    keys = set(get_peft_model_state_dict(model))
    for target in TARGETS:
        assert f"base_model.model.{target}.lora_magnitude_vector" in keys
    assert not any(k.endswith("lora_magnitude_vector.weight") or ".default" in k for k in keys)
    assert "base_model.model.lin0.lora_magnitude_vector.default.weight" in model.state_dict()


def test_merge_two_dora_adapters_in_turn_matches_forward():
    base, model = _model()
    model.add_adapter("other", LoraConfig(target_modules=["lin0", "conv"], use_dora=True, init_lora_weights=False))
    _perturb_magnitudes(model)
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    ids = _ids()
    out = model(ids)
    model.merge_adapter()
    torch.testing.assert_close(model(ids), out)
    model.unmerge_adapter()
    for name, param in base.named_parameters():
        torch.testing.assert_close(model.get_base_model().get_parameter(_wrapped(name)), param, atol=1e-12, rtol=0)


def test_dropout_formula():
    """With dropout in training: `y = base(x) + (f - 1) W h + f s B A h`, `h = dropout(x)` (upstream's form)."""
    _, model = _model(lora_dropout=0.5)
    _perturb_magnitudes(model)
    layer = model.base_model.model.lin0
    layer.train()
    x = torch.randn(4, 6, dtype=F64)
    torch.manual_seed(9)
    out = layer(x)
    torch.manual_seed(9)
    h = layer.lora_dropout["default"](x)
    W, name = layer.base_layer.weight, "default"
    s = layer.scaling[name]
    dW = s * layer.lora_B[name].weight @ layer.lora_A[name].weight
    f = layer.lora_magnitude_vector[name].weight / (W + dW).norm(dim=1)
    expected = layer.base_layer(x) + (f - 1) * (h @ W.T) + f * (h @ dW.T)
    torch.testing.assert_close(out, expected)
    layer.eval()  # eval: no dropout, the merged form
    torch.testing.assert_close(layer(x), _closed_form_linear(layer, x))


def test_training_step_changes_magnitude_and_norm_gets_no_gradient():
    _, model = _model(init_lora_weights=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"base_model.model.{t}.lora_magnitude_vector.default.weight" for t in TARGETS} <= trainable
    magnitude = model.base_model.model.lin0.lora_magnitude_vector["default"].weight
    before = magnitude.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(_ids()).pow(2).mean()
    loss.backward()
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, magnitude.detach())


def test_refusals():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        LoraConfig(target_modules=["lin0"], use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="use_dora=True with LoRA-GA"):
        LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights="lora_ga")
    from peft import LoraGAConfig, LoraProConfig

    with pytest.raises(ValueError, match="use_dora=True with LoRA-GA"):
        LoraGAConfig(target_modules=["lin0"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True with LoRA-Pro"):
        LoraProConfig(target_modules=["lin0"], use_dora=True)


def test_grouped_conv_norm_uses_the_dense_kernel():
    """A grouped conv's update is dense: DoRA's norm and weight are those of `dense(W) + dW` (merging is refused)."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(F64)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    dense = dora.dense_group_kernel(base.weight, 2)
    assert dense.shape == (6, 4, 3, 3)
    torch.testing.assert_close(nn.functional.conv2d(x, dense, base.bias, padding=1), base(x))
    model = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                           LoraConfig(target_modules=["0"], use_dora=True, r=2, init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 6, dtype=F64).view(1, -1, 1, 1))
    Wp = dense + layer.get_delta_weight("default")
    m = layer.lora_magnitude_vector["default"].weight.reshape(-1)
    expected = nn.functional.conv2d(x, (m / Wp.flatten(1).norm(dim=1)).view(-1, 1, 1, 1) * Wp, base.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
