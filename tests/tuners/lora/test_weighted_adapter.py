"""add_weighted_adapter: the combination math in float64 and the adapter it builds."""

import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model
from peft.tuners.lora.weighted import cat_factors, low_rank_factors, merge_factors
from peft.utils import merge_utils


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 5, dtype=torch.float64)
        self.emb = nn.Embedding(7, 4, dtype=torch.float64)
        self.conv = nn.Conv2d(2, 3, 3, dtype=torch.float64)

    def forward(self, x):
        return self.lin0(x)


def _model(ranks=(2, 3), targets=("lin0", "emb", "conv")):
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=ranks[0], lora_alpha=3, target_modules=list(targets),
                                             init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=ranks[1], lora_alpha=5, target_modules=list(targets),
                                      init_lora_weights=False))
    return model


def test_cat_is_exact_weighted_sum():
    A = [torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)]
    B = [torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    A2, B2 = cat_factors(list(zip(A, B)), [0.7, -1.5])
    torch.testing.assert_close(B2 @ A2, 0.7 * B[0] @ A[0] - 1.5 * B[1] @ A[1], rtol=0, atol=1e-12)


def test_low_rank_factors_is_best_rank_k():
    D = torch.randn(7, 5, dtype=torch.float64)
    A, B = low_rank_factors(D, 2)
    U, S, Vh = torch.linalg.svd(D)
    torch.testing.assert_close(B @ A, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2])
    # Eckart-Young: the error equals the norm of the dropped singular values
    torch.testing.assert_close(torch.linalg.norm(D - B @ A), S[2:].norm())
    A, B = low_rank_factors(D, 9)  # rank above min(m, n): exact, zero padded to 9
    assert A.shape == (9, 5) and B.shape == (7, 9)
    torch.testing.assert_close(B @ A, D)


def test_ties_by_hand():
    t1 = torch.tensor([[3.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    t2 = torch.tensor([[-4.0, 2.0, 1.0, 0.1]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = merge_utils.ties([t1, t2], w, density=0.5, majority_sign_method="total")
    # keep top 2 by |.|: t1 -> [3, 0, 0, 2]; t2 -> [-4, 2, 0, 0]
    # sign of sum: [-1, +, +(0), +]; agreeing weighted entries averaged
    expected = torch.tensor([[-2.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    freq = merge_utils.ties([t1, t2], w, density=0.5, majority_sign_method="frequency")
    # frequency: signs [+,-] -> 0 -> +: entry 0 keeps 3 (t1 only)
    torch.testing.assert_close(freq, torch.tensor([[3.0, 1.0, 0.0, 2.0]], dtype=torch.float64))


def test_dare_by_hand_with_seed():
    t = [torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)]
    w = torch.tensor([0.3, 2.0], dtype=torch.float64)
    torch.manual_seed(3)
    masks = [torch.bernoulli(torch.full_like(x, 0.4)) for x in t]
    torch.manual_seed(3)
    out = merge_utils.dare_linear(t, w, 0.4)
    torch.testing.assert_close(out, 0.3 * t[0] * masks[0] / 0.4 + 2.0 * t[1] * masks[1] / 0.4)
    torch.manual_seed(3)
    out = merge_utils.dare_ties(t, w, 0.4)
    pruned = torch.stack([x * m / 0.4 for x, m in zip(t, masks)])
    elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    agree = pruned.sign() == elected
    weighted = pruned * w.view(2, 1, 1)
    torch.testing.assert_close(out, (weighted * agree).sum(0) / agree.sum(0).clamp(min=1))


def test_magnitude_prune_by_hand():
    t = torch.tensor([1.0, -5.0, 2.0, 0.5], dtype=torch.float64)
    out = merge_utils.magnitude_prune([t], torch.tensor([2.0], dtype=torch.float64), 0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, -10.0, 4.0, 0.0], dtype=torch.float64))


def test_merge_factors_signs():
    A, B = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    A2, B2 = merge_factors([(A, B)], [-4.0], "linear", None, "total")
    torch.testing.assert_close(B2 @ A2, -4.0 * B @ A)


def _delta(layer, name):
    return layer.get_delta_weight(name)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_model_combination_is_exact(kind):
    model = _model()
    svd_rank = 5 if kind == "svd" else None  # rank 2 + 3 fits in 5: the SVD is exact
    model.add_weighted_adapter(["default", "b"], [0.6, -1.2], "mix", combination_type=kind, svd_rank=svd_rank)
    assert model.peft_config["mix"].r == 5 and model.peft_config["mix"].lora_alpha == 5
    for _, layer in model.base_model.tuner_layers():
        expected = 0.6 * _delta(layer, "default") - 1.2 * _delta(layer, "b")
        torch.testing.assert_close(_delta(layer, "mix"), expected)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)


def test_svd_truncated_is_best_rank_k_per_layer():
    model = _model()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=1)
    layer = model.base_model.model.lin0
    full = _delta(layer, "default") + _delta(layer, "b")
    U, S, Vh = torch.linalg.svd(full)
    torch.testing.assert_close(_delta(layer, "mix"), S[0] * torch.outer(U[:, 0], Vh[0]))


def test_linear_single_adapter_and_forward():
    model = _model()
    model.add_weighted_adapter(["b"], [2.0], "twice", combination_type="svd")  # one adapter: linear
    model.set_adapter("twice")
    x = torch.randn(3, 6, dtype=torch.float64)
    base = model.base_model.model.lin0.base_layer(x)
    torch.testing.assert_close(model(x) - base, 2.0 * (x @ _delta(model.base_model.model.lin0, "b").T))


def test_bad_requests_leave_model_unchanged():
    model = _model()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="same r"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="nope")
    with pytest.raises(ValueError, match="does not exist"):
        model.add_weighted_adapter(["default", "zzz"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="weights"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="ties_svd")
    assert set(model.state_dict()) == keys and "x" not in model.peft_config
