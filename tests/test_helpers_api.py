"""`peft.helpers`: rescale_adapter_scale, disable_input_dtype_casting, DoraCaching, check_if_peft_model, KappaTune."""

import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model
from peft.helpers import (
    DoraCaching,
    KappaTuneSelector,
    check_if_peft_model,
    condition_number,
    disable_input_dtype_casting,
    find_kappa_target_modules,
    rescale_adapter_scale,
)
from peft.tuners.lora import dora


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.lin0(x)).view(x.shape[0], 2, 4)
        return self.lin1(self.conv(h).flatten(1))


def _model(use_dora=False, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=["lin0", "conv", "lin1"], init_lora_weights=False, use_dora=use_dora)
    return get_peft_model(MLP().double(), config)


@pytest.fixture(autouse=True)
def _no_global_caching():
    DoraCaching()(enabled=False)
    yield
    DoraCaching()(enabled=False)


def test_rescale_equals_closed_form_and_restores():
    model = _model().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        with model.disable_adapter():
            base = model(x)
        scalings = {n: dict(m.scaling) for n, m in model.named_modules() if hasattr(m, "scaling")}
        with rescale_adapter_scale(model, 0.0):
            assert torch.allclose(model(x), base)
        # one layer: y = base(x) + multiplier * s B A x, checked against the layer's own factors
        layer = model.base_model.model.lin0
        xin = torch.randn(5, 6, dtype=torch.float64)
        expected = layer.base_layer(xin) + 0.5 * layer.scaling["default"] * (
            xin @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T)
        with rescale_adapter_scale(model, 0.5):
            assert torch.allclose(layer(xin), expected)
            assert not torch.allclose(model(x), full)
        assert torch.allclose(model(x), full)
    assert {n: dict(m.scaling) for n, m in model.named_modules() if hasattr(m, "scaling")} == scalings


def test_rescale_restores_on_error_and_validates():
    model = _model()
    before = dict(model.base_model.model.lin0.scaling)
    with pytest.raises(KeyError):
        with rescale_adapter_scale(model, 3):
            raise KeyError("boom")
    assert model.base_model.model.lin0.scaling == before
    with pytest.raises(TypeError, match="multiplier should be of type float"):
        with rescale_adapter_scale(model, "a"):
            pass
    with pytest.raises(ValueError, match="LoraLayer"):
        with rescale_adapter_scale(MLP(), 0.5):
            pass


def test_disable_input_dtype_casting_passes_input_dtype():
    model = _model()
    layer = model.base_model.model.lin0
    seen = []
    layer.lora_A["default"].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    x = torch.randn(2, 6, dtype=torch.float64)
    layer(x)
    with disable_input_dtype_casting(model, active=False):
        layer(x)
    with pytest.raises(RuntimeError):
        with disable_input_dtype_casting(model):
            layer(x)  # float64 input into float32 lora_A: casting really is off
    layer(x)
    assert seen == [torch.float32, torch.float32, torch.float64, torch.float32]


def _caches(model):
    return [m._dora_cache for m in model.modules() if hasattr(m, "_dora_cache")]


def test_dora_caching_same_outputs_and_cache_lifecycle():
    model = _model(use_dora=True)
    x = torch.randn(3, 6, dtype=torch.float64)
    caches = _caches(model)
    assert len(caches) == 3
    model.eval()
    with torch.no_grad():
        reference = model(x)
        with DoraCaching():
            assert dora.ENABLE_DORA_CACHING
            first = model(x)
            assert all(caches)
            stored = [dict(c) for c in caches]
            second = model(x)
            assert all(c["weight-norm"] is s["weight-norm"] for c, s in zip(caches, stored))  # reused, not redone
        assert not dora.ENABLE_DORA_CACHING
        assert torch.allclose(first, reference) and torch.allclose(second, reference)
        model(x)
        assert not any(caches)
        with DoraCaching():
            model(x)
            model.train()
            assert not any(caches)
            model(x)
            assert not any(caches)  # never in train mode


def test_dora_cache_cleared_by_merge():
    model = _model(use_dora=True).eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    DoraCaching()(enabled=True)
    with torch.no_grad():
        reference = model(x)
        assert all(_caches(model))
        model.merge_adapter()
        assert not any(_caches(model))
        assert torch.allclose(model(x), reference)
        model.unmerge_adapter()
        assert torch.allclose(model(x), reference)


def test_check_if_peft_model(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "ok")
    assert check_if_peft_model(tmp_path / "ok") is True
    assert check_if_peft_model(str(tmp_path / "missing")) is False
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"foo": "bar"}')
    assert check_if_peft_model(tmp_path / "broken") is False


def test_condition_number_closed_form():
    weight = torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert condition_number(q @ weight) == pytest.approx(8.0, rel=1e-6)


def test_kappa_selection_ranks_by_condition_number():
    model = nn.Module()
    model.good = nn.Linear(4, 4, bias=False)
    model.bad = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.good.weight.copy_(torch.eye(4))
        model.bad.weight.copy_(torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0])))
    model.experts = nn.Module()
    model.experts.gate_up_proj = nn.Parameter(torch.eye(4).repeat(2, 1, 1))
    result = find_kappa_target_modules(model, top_p=0.5, show_progress=False)
    assert result == {"target_modules": ["good"], "target_parameters": ["experts.gate_up_proj"]}
    selector = KappaTuneSelector(model, show_progress=False)
    assert selector.get_best_targets() == ["good", "bad"]
    assert selector.get_best_targets(threshold=2.0) == ["good"]
    assert selector.get_best_targets(num_modules=5) == ["good", "bad"]
    assert find_kappa_target_modules(MLP(), show_progress=False)["target_parameters"] is None
