"""EVA: the rank rule, components == top principal directions of the layer inputs, and the init on a PeftModel."""

import copy

import pytest
import torch
from torch import nn

from peft import EvaConfig, LoraConfig, PeftModel, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.eva import components_converged, redistribute_ranks


def test_redistribute_ranks_takes_largest_ratios():
    explained = {"a": torch.tensor([0.6, 0.3, 0.05, 0.01]), "b": torch.tensor([0.4, 0.35, 0.2, 0.04])}
    # pooled, largest first: a0 .6, b0 .4, b1 .35, a1 .3, b2 .2, ...
    assert redistribute_ranks(explained, 4, {"a": 4, "b": 4}) == {"a": 2, "b": 2}
    assert redistribute_ranks(explained, 5, {"a": 4, "b": 4}) == {"a": 2, "b": 3}
    assert redistribute_ranks(explained, 3, {"a": 1, "b": 4}) == {"a": 1, "b": 2}  # a capped at 1 component
    assert redistribute_ranks({"a": torch.tensor([0.9]), "b": torch.tensor([0.1])}, 1, {"a": 1, "b": 1}) == \
        {"a": 1, "b": 0}


def test_components_converged():
    V = torch.eye(3)
    W = torch.stack([V[0], (V[1] + V[2]) / 2 ** 0.5, -V[2]])
    assert components_converged(V, W, 0.99).tolist() == [True, False, False]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([6.0, 4.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    X = (torch.randn(64, 8, generator=g) * scales) @ Q.T + 1.0
    return [X[i:i + 16] for i in range(0, 64, 16)]


def _pca(X, k):
    Xc = (X - X.mean(0)).double()
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Vh[:k], (S.square() / Xc.square().sum())


def _config(**eva):
    return LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="eva",
                      eva_config=EvaConfig(**eva))


def _state(model, batches, config):
    return get_eva_state_dict(model, batches, config, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                              prepare_layer_inputs_fn=None, show_progress_bar=False)


def test_components_are_top_principal_directions_and_ranks_follow_rule():
    torch.manual_seed(0)
    model, batches = Net().eval(), _data()
    state = _state(model, batches, _config(rho=2.0, tau=0.999))
    X0 = torch.cat(batches)
    X1 = torch.relu(model.lin0(X0)).detach()
    V0, ratio0 = _pca(X0, 4)
    V1, ratio1 = _pca(X1, 4)
    expected = redistribute_ranks({"lin0": ratio0[:4], "lin1": ratio1[:4]}, 4, {"lin0": 4, "lin1": 4})
    assert {k: v.shape[0] for k, v in state.items()} == expected
    for name, V in (("lin0", V0), ("lin1", V1)):
        k = state[name].shape[0]
        cos = torch.nn.functional.cosine_similarity(state[name].double(), V[:k], dim=1).abs()
        assert torch.all(cos > 0.999), (name, cos)


def test_rho_one_keeps_ranks_and_whiten_scales():
    torch.manual_seed(0)
    model, batches = Net().eval(), _data()
    plain = _state(model, batches, _config(rho=1.0))
    white = _state(model, batches, _config(rho=1.0, whiten=True))
    assert {k: v.shape[0] for k, v in plain.items()} == {"lin0": 2, "lin1": 2}
    ratio = white["lin0"].norm(dim=1) / plain["lin0"].norm(dim=1)
    assert torch.all(ratio < 1.0)  # divided by sqrt of singular values > 1


def test_initialize_on_peft_model_keeps_output_scaling_and_reloads(tmp_path):
    torch.manual_seed(0)
    base, batches = Net().eval(), _data()
    x = torch.cat(batches)
    expected_out = base(x)
    config = _config(rho=2.0)
    state = _state(copy.deepcopy(base), batches, config)
    model = get_peft_model(copy.deepcopy(base), config)
    scalings = {n: m.scaling["default"] for n, m in model.named_modules() if hasattr(m, "scaling")}
    initialize_lora_eva_weights(model, eva_state_dict=state)
    torch.testing.assert_close(model(x), expected_out)  # B = 0
    for name, A in state.items():
        layer = getattr(model.base_model.model, name)
        if A.shape[0] == 0:
            assert not hasattr(layer, "lora_A")
            continue
        torch.testing.assert_close(layer.lora_A["default"].weight, A)
        assert layer.scaling["default"] == pytest.approx(scalings[f"base_model.model.{name}"])
    for m in model.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B["default"].weight)
    trained = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), trained)


def test_initialize_from_dataloader_and_bad_usage():
    torch.manual_seed(0)
    base, batches = Net().eval(), _data()
    model = get_peft_model(copy.deepcopy(base), _config(rho=1.0))
    initialize_lora_eva_weights(model, batches, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (2, 8)
    with pytest.raises(ValueError, match="dataloader is required"):
        initialize_lora_eva_weights(get_peft_model(copy.deepcopy(base), _config()))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["lin0"])), batches)
    with pytest.raises(ValueError, match="dataloader is empty"):
        get_eva_state_dict(base, [], _config())
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)


def test_config_round_trip(tmp_path):
    LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=7.5)).save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).eva_config == EvaConfig(rho=7.5)


def test_rank_zero_unwraps_layer_and_small_batches_raise(tmp_path):
    torch.manual_seed(0)
    base, batches = Net().eval(), _data()
    model = get_peft_model(copy.deepcopy(base), _config())
    A = torch.randn(3, 8)
    initialize_lora_eva_weights(model, eva_state_dict={"lin0": A, "lin1": torch.zeros(0, 8)})
    assert not hasattr(model.base_model.model.lin1, "lora_A")
    assert model.peft_config["default"].rank_pattern == {"lin0": 3}
    assert model.peft_config["default"].alpha_pattern == {"lin0": 6.0}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded.base_model.model.lin0.lora_A["default"].weight, A)
    assert not hasattr(loaded.base_model.model.lin1, "lora_A")
    tiny = [b[:2] for b in batches]  # 2 rows < 4 components per layer
    with pytest.raises(ValueError, match="never saw a batch"):
        _state(base, tiny, _config(rho=2.0))
