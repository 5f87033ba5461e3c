"""CorDA: the covariance-weighted SVD in float64, the unchanged output at init, caches, Conv1D and reloading."""

import copy

import pytest
import torch
from torch import nn

from peft import CordaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.corda import corda_factors, covariance_svd, crop, damped_covariance, preprocess_corda
from peft.tuners.lora.init_methods import residual_weight

D = torch.float64


def _weight_and_cov(m=7, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(50, n, generator=g, dtype=D)
    return torch.randn(m, n, generator=g, dtype=D), X.T @ X / 50


def test_damped_covariance_is_inverted():
    _, cov = _weight_and_cov()
    fixed, inverse = damped_covariance(cov)
    torch.testing.assert_close(fixed - cov, 0.01 * torch.diagonal(cov).mean() * torch.eye(10, dtype=D))
    torch.testing.assert_close(fixed @ inverse, torch.eye(10, dtype=D))


def test_full_decomposition_reconstructs_weight():
    W, cov = _weight_and_cov()
    eig = covariance_svd(W, cov)
    torch.testing.assert_close(eig.U_WC @ torch.diag(eig.S_WC) @ eig.V_WC.T, W)
    fixed, _ = damped_covariance(cov)
    _, S, _ = torch.linalg.svd(W @ fixed)  # singular values are those of W C_d
    torch.testing.assert_close(eig.S_WC, S)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("scaling", [1.0, 0.25])
def test_init_preserves_weight(method, scaling):
    W, cov = _weight_and_cov()
    full = covariance_svd(W, cov)
    eig = crop(full, 3, method)
    expect = full.S_WC[:3] if method == "ipm" else full.S_WC[-3:]
    torch.testing.assert_close(eig.S_WC, expect)
    A, B = corda_factors(eig, scaling)
    assert A.shape == (3, 10) and B.shape == (7, 3)
    torch.testing.assert_close(scaling * B @ A, eig.U_WC @ torch.diag(eig.S_WC) @ eig.V_WC.T)
    torch.testing.assert_close(residual_weight(W, A, B, scaling) + scaling * B @ A, W)


def test_crop_refuses_unknown_method():
    W, cov = _weight_and_cov()
    with pytest.raises(ValueError, match="corda_method='xyz'"):
        crop(covariance_svd(W, cov), 2, "xyz")
    with pytest.raises(ValueError, match="corda_method='xyz'"):
        CordaConfig(corda_method="xyz")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 6)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def _setup(method="ipm", **corda):
    torch.manual_seed(0)
    model = Net().eval()
    data = torch.randn(40, 16)
    config = LoraConfig(init_lora_weights="corda", target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                        rank_pattern={"lin1": 2}, corda_config=CordaConfig(corda_method=method, **corda))
    return model, data, config


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_model_output_unchanged_and_reload(method, tmp_path):
    model, data, config = _setup(method)
    base_out = model(data)
    preprocess_corda(model, config, run_model=lambda: model(data))
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.testing.assert_close(peft_model(data), base_out, atol=1e-5, rtol=1e-5)
    assert peft_model.base_model.model.lin1.lora_A["default"].weight.shape == (2, 12)
    assert not hasattr(peft_model.base_model.model.lin0.base_layer, "eigens")
    with torch.no_grad():
        peft_model.base_model.model.lin0.lora_B["default"].weight.mul_(2.0)
    trained = peft_model(data)
    assert not torch.allclose(trained, base_out, atol=1e-4)
    peft_model.save_pretrained(tmp_path)
    # as upstream: loading re-runs the init from the preprocessed model's eigens, so the base becomes the residual
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(loaded(data), trained)
    with loaded.disable_adapter():
        assert not torch.allclose(loaded(data), base_out, atol=1e-4)  # the base holds W - s B A
        torch.testing.assert_close(peft_model.base_model.model.lin0.base_layer.weight,
                                   loaded.base_model.model.lin0.base_layer.weight)


def test_covariance_and_sample_count_and_hooks_removed():
    model, data, config = _setup(prune_temporary_fields=False)
    preprocess_corda(model, config, run_model=lambda: [model(data), model(2 * data)])
    assert model.lin0.sample_count == 2
    x = data / data.max().abs()
    torch.testing.assert_close(model.lin0.covariance_matrix, x.T @ x, atol=1e-5, rtol=1e-5)  # 2x / max(2x) == x
    assert model.lin0.rank == 4 and model.lin1.rank == 2 and model.lin0.corda_method == "ipm"
    assert not model.lin0._forward_hooks
    model(data)
    assert model.lin0.sample_count == 2


def test_cache_files_reproduce_init(tmp_path):
    model, data, config = _setup(cache_file=str(tmp_path / "c" / "cache.pt"), covariance_file=tmp_path / "cov.pt")
    original = copy.deepcopy(model)
    preprocess_corda(model, config, run_model=lambda: model(data))
    first = get_peft_model(model, config)
    for name in ("cache_file", "covariance_file"):
        other = copy.deepcopy(original)
        cfg = copy.deepcopy(config)
        cfg.corda_config = CordaConfig(**{name: getattr(config.corda_config, name)})
        preprocess_corda(other, cfg)  # no run_model needed
        second = get_peft_model(other, cfg)
        for key in ("lin0", "lin1"):
            a = getattr(first.base_model.model, key)
            b = getattr(second.base_model.model, key)
            torch.testing.assert_close(a.lora_A["default"].weight, b.lora_A["default"].weight)
            torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight)


def test_bad_usage_raises():
    model, data, config = _setup()
    with pytest.raises(ValueError, match="preprocess_corda"):
        get_peft_model(copy.deepcopy(model), config)  # no eigens
    with pytest.raises(ValueError, match="run_model"):
        preprocess_corda(model, config)
    preprocess_corda(model, config, run_model=lambda: model(data))
    config.r, config.rank_pattern = 3, {}
    with pytest.raises(ValueError, match="do not fit"):
        get_peft_model(model, config)


def test_config_round_trip(tmp_path):
    config = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    config.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.corda_config == CordaConfig(corda_method="kpm")


def test_conv1d_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    base = model(ids).logits
    config = LoraConfig(init_lora_weights="corda", target_modules=["c_fc"], fan_in_fan_out=True, r=4,
                        corda_config=CordaConfig())
    preprocess_corda(model, config, run_model=lambda: model(ids))
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(peft_model(ids).logits, base, atol=1e-4, rtol=1e-4)
