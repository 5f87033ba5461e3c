"""PiSSA / OLoRA / orthogonal inits: the math in float64, the unchanged model output, and the PiSSA-to-LoRA save."""

import copy
import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.init_methods import olora_factors, orthogonal_factors, pissa_factors, residual_weight

D = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 9, dtype=D)
        self.out = nn.Linear(9, 4, dtype=D)

    def forward(self, x):
        return self.out(torch.relu(self.linear(x)))


def _net():
    torch.manual_seed(0)
    return Net()


X = torch.randn(5, 12, dtype=D)


def test_pissa_factors_are_top_r_svd():
    W = torch.randn(9, 12, dtype=D)
    A, B = pissa_factors(W, 3, scaling=0.5)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(0.5 * B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    torch.testing.assert_close(residual_weight(W, A, B, 0.5) + 0.5 * B @ A, W)
    # the residual holds exactly the remaining singular values
    torch.testing.assert_close(torch.linalg.svdvals(residual_weight(W, A, B, 0.5))[:6], S[3:9])
    # A and B are balanced: A A^T = B^T B = diag(S_r / s)
    torch.testing.assert_close(A @ A.T, torch.diag(S[:3] / 0.5))
    torch.testing.assert_close(B.T @ B, torch.diag(S[:3] / 0.5))


def test_pissa_niter_close_on_low_rank_matrix():
    torch.manual_seed(1)
    W = torch.randn(9, 3, dtype=D) @ torch.randn(3, 12, dtype=D)  # rank 3: the randomized SVD is exact
    A, B = pissa_factors(W, 3, scaling=2.0, niter=4)
    torch.testing.assert_close(2.0 * B @ A, W)


def test_olora_factors_qr():
    W = torch.randn(9, 12, dtype=D)
    A, B = olora_factors(W, 4)
    torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=D))
    assert torch.allclose(A.tril(-1), torch.zeros_like(A))  # R rows: upper triangular
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(B @ A, Q[:, :4] @ R[:4])


def test_orthogonal_factors_product_zero():
    torch.manual_seed(0)
    A, B = orthogonal_factors(12, 9, 6, dtype=D)
    assert A.shape == (6, 12) and B.shape == (9, 6)
    assert A.abs().sum() > 0 and B.abs().sum() > 0
    assert (B @ A).abs().max() < 1e-6
    with pytest.raises(ValueError, match="even, got 5"):
        orthogonal_factors(12, 9, 5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "orthogonal"])
@pytest.mark.parametrize("rslora", [False, True])
def test_init_preserves_output(init, rslora):
    base = _net()
    expected = base(X)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["linear", "out"],
                                                           init_lora_weights=init, use_rslora=rslora))
    layer = model.base_model.model.linear
    assert layer.lora_B["default"].weight.abs().sum() > 0  # a non-trivial adapter
    torch.testing.assert_close(model(X), expected, atol=1e-6 if init == "orthogonal" else 1e-12, rtol=0)
    with model.disable_adapter():
        changed = not torch.allclose(model(X), expected)
    assert changed == (init != "orthogonal")  # PiSSA / OLoRA keep the residual in the base
    # the residual + scaled product is the original weight
    W = base.linear.weight
    torch.testing.assert_close(layer.base_layer.weight + layer.get_delta_weight("default"), W, atol=1e-6, rtol=0)


def test_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(9, 12).to(D)

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(0)
    base = G()
    expected = base(X)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True,
                                                           init_lora_weights="pissa"))
    torch.testing.assert_close(model(X), expected)


def test_unsupported_options_refused():
    # "eva" / "corda" are implemented (tests/tuners/lora/test_eva.py, test_corda.py); corda needs preprocess_corda
    with pytest.raises(ValueError, match="preprocess_corda"), pytest.warns(UserWarning, match="corda_config"):
        get_peft_model(_net(), LoraConfig(target_modules=["linear"], init_lora_weights="corda"))
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa_niter_")
    with pytest.raises(ValueError, match="even"):
        get_peft_model(_net(), LoraConfig(r=3, target_modules=["linear"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora(init, tmp_path):
    base = _net()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["linear"], init_lora_weights=init))
    model.save_pretrained(tmp_path / "init")
    model.base_model.model.linear.lora_B["default"].weight.data *= 2.0  # "training"
    trained = model(X)
    model.save_pretrained(tmp_path / "plain")  # as it is: loading re-runs the init on the base
    torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")(X), trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "conv")
    assert loaded.peft_config["default"].r == 6 and loaded.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(loaded(X), trained)
    torch.testing.assert_close(loaded.base_model.model.linear.base_layer.weight, base.linear.weight, rtol=0, atol=0)


def test_other_adapter_warns():
    model = get_peft_model(_net(), LoraConfig(target_modules=["linear"], init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):
        model.add_adapter("other", LoraConfig(target_modules=["out"]))


def _grid(matrix):  # a toy quantizer: round to multiples of 0.5
    return torch.round(matrix * 2) / 2


@pytest.mark.parametrize("num_iter", [1, 2, 4])
def test_loftq_factors_alternation(num_iter):
    from peft.tuners.lora.init_methods import loftq_factors

    torch.manual_seed(0)
    W = torch.randn(9, 12, dtype=D)
    Q, A, B = loftq_factors(W, 3, num_iter, _grid)
    # by hand: the same alternation
    target = W
    for _ in range(num_iter):
        Q_ref = _grid(target)
        U, S, Vh = torch.linalg.svd(W - Q_ref, full_matrices=False)
        BA_ref = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        target = W - BA_ref
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=0)
    torch.testing.assert_close(B @ A, BA_ref)
    assert torch.linalg.norm(W - Q - B @ A) <= torch.linalg.norm(W - Q)  # the adapter only reduces the error


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_model(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoftQConfig

    base = _net()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["linear"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": bits, "loftq_iter": 2}
    model = get_peft_model(copy.deepcopy(base), config)
    layer = model.base_model.model.linear
    W, Q = base.linear.weight, layer.base_layer.weight
    assert not torch.equal(Q, W)
    assert torch.linalg.norm(W - Q - layer.get_delta_weight("default")) < torch.linalg.norm(W - Q)
    model.save_pretrained(tmp_path / "a")  # loading re-runs LoftQ on the float base: the same model
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(loaded(X), model(X))
    with pytest.raises(ValueError, match="loftq_config"):
        LoraConfig(target_modules=["linear"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits"):
        LoraConfig(target_modules=["linear"], init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
