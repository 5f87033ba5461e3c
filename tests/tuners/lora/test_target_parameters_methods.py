"""LoRA-GA and LoRA-Pro on `target_parameters` (fused 3-D MoE experts): every expert is its own m x n matrix, so
LoRA-GA initialises each from the SVD of its own gradient and LoRA-Pro adjusts each expert's (gA, gB) on its own."""

from __future__ import annotations

import pytest
import torch

from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.optimizers import LoraProAdamW, register_lorapro_adjustment
from peft.tuners.lora.param_wrapper import ParamWrapper, expert_factors
from peft.tuners.loraga import init_math as im
from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient
from tests.tuners.lora.test_target_parameters import EXPERTS, ids, lora, tiny_moe


def batches(n: int = 2):
    out = []
    for seed in range(n):
        x = ids(seed + 10)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def expert_view(stored: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(E, m, n) = (experts, out, in), built here independently of the package."""
    return torch.stack([(w.T if transposed else w) for w in stored])


# --- LoRA-GA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("upstream_spelling", [False, True])
def test_loraga_init_per_expert_svd(kind, upstream_spelling):
    model, data = tiny_moe(kind), batches()
    with torch.no_grad():
        ref = model(data[0]["input_ids"]).logits
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    kwargs = dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=4)
    if upstream_spelling:
        config = LoraConfig(init_lora_weights="lora_ga",
                            lora_ga_config={"direction": "ArB2r", "scale": "stable", "dtype": "fp64"}, **kwargs)
    else:
        config = LoraGAConfig(direction="ArB2r", scale="stable", dtype="fp64", **kwargs)
    grads = estimate_gradient(model, data, peft_config=config)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert grads[key].shape == before[key].shape and len(grads) == 4  # 2 layers x 2 stacks
    with LoraGAContext(model=model, named_grad=grads):
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        out = peft_model(data[0]["input_ids"]).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5  # the offset keeps the output
    wrappers = [(k, m) for k, m in peft_model.base_model.model.named_modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4
    for path, layer in wrappers:
        pkey = f"{path.replace('.base_layer', '')}.{layer.parameter_name}"
        transposed = kind == "gpt_oss"
        G = expert_view(grads[pkey].double(), transposed)  # (E, m, n)
        W0 = expert_view(before[pkey].double(), transposed)
        A = layer.lora_A["default"].weight.double()
        B = layer.lora_B["default"].weight.double()
        E, s = G.shape[0], layer.scaling["default"]
        for e in range(E):
            A_e, B_e = A[e * 2:(e + 1) * 2], B[:, e::E]  # the stored layout, read by hand
            U, _, Vh = torch.linalg.svd(G[e], full_matrices=False)
            factor = im.scale_factor("stable", G.shape[1], s, 16, None)
            # ArB2r: A = V^T[0:r], B = U[:, r:2r] (up to sign), both times the stable factor
            torch.testing.assert_close((A_e @ Vh[:2].T).abs(), torch.eye(2, dtype=torch.float64) * factor,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close((U[:, 2:4].T @ B_e).abs(), torch.eye(2, dtype=torch.float64) * factor,
                                       rtol=1e-5, atol=1e-6)
            W_e = expert_view(layer.get_param().detach().double(), transposed)[e]
            torch.testing.assert_close(W_e, W0[e] - s * B_e @ A_e, rtol=0, atol=1e-6)


def test_loraga_sketch_refuses_target_parameters():
    config = LoraGAConfig(target_modules=[], target_parameters=EXPERTS, r=2)
    with pytest.raises(ValueError, match="target_parameters"):
        estimate_gradient(tiny_moe(), batches(1), peft_config=config, low_rank=8)


# --- LoRA-Pro --------------------------------------------------------------------------------------------------------
def closed_form(A, B, gA, gB, s):
    """Paper eq. 8 with the Sylvester X, in float64, by a Kronecker solve (independent of the package)."""
    A, B, gA, gB = (t.contiguous() for t in (A, B, gA, gB))
    r = A.shape[0]
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv, AAt_inv = torch.linalg.inv(BtB), torch.linalg.inv(AAt)
    C = -(1 / s**2) * BtB_inv @ gA @ A.T
    eye = torch.eye(r, dtype=A.dtype)
    K = torch.kron(eye, BtB) + torch.kron(AAt.T.contiguous(), eye)  # column-major vec: (I (x) P) + (Q^T (x) I)
    X = torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T
    gA_new = (1 / s**2) * BtB_inv @ gA + X @ A
    proj = torch.eye(B.shape[0], dtype=A.dtype) - B @ BtB_inv @ B.T
    gB_new = (1 / s**2) * proj @ gB @ AAt_inv - B @ X
    return gA_new, gB_new


def test_lorapro_step_on_experts_equals_closed_form():
    model = lora(tiny_moe(), r=2, lora_alpha=4)  # fp32 (the experts' grouped_mm has no fp64 kernel)
    x = ids()
    model(x, labels=x).loss.backward()
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    before = {id(w): (w.lora_A["default"].weight.detach().clone(), w.lora_B["default"].weight.detach().clone(),
                      w.lora_A["default"].weight.grad.clone(), w.lora_B["default"].weight.grad.clone())
              for w in wrappers}
    lr = 1e-2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    register_lorapro_adjustment(opt, model, x_mode="sylvester", damping=0.0)
    opt.step()
    checked = 0
    for w in wrappers:
        A, B, gA, gB = before[id(w)]
        A_e, B_e = expert_factors(A.double(), B.double(), w.num_experts)
        gA_e, gB_e = expert_factors(gA.double(), gB.double(), w.num_experts)
        # SGD leaves the gradients it applied in .grad: the hook replaced them by the adjusted ones
        new_gA_e, new_gB_e = expert_factors(w.lora_A["default"].weight.grad.double(),
                                            w.lora_B["default"].weight.grad.double(), w.num_experts)
        for e in range(w.num_experts):
            if gA_e[e].abs().max() == 0:  # an expert no token reached: nothing to check
                continue
            want_gA, want_gB = closed_form(A_e[e], B_e[e], gA_e[e], gB_e[e], w.scaling["default"])
            step_A, step_B = new_gA_e[e], new_gB_e[e]
            torch.testing.assert_close(step_A, want_gA, rtol=1e-3, atol=1e-3 * want_gA.abs().max().item())
            torch.testing.assert_close(step_B, want_gB, rtol=1e-3, atol=1e-3 * want_gB.abs().max().item())
            assert (step_A - gA_e[e]).abs().max() > 1e-3 * gA_e[e].abs().max()  # adjusted, not the plain gradient
            checked += 1
    assert checked >= 8


def test_lorapro_adamw_refuses_expert_stacks():
    model = lora(tiny_moe())
    with pytest.raises(ValueError, match="expert"):
        LoraProAdamW(model, lr=1e-3)


def test_lorapro_adamw_takes_2d_target_parameters():
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)),
                           LoraConfig(target_parameters=["0.weight"], r=2, init_lora_weights=False))
    opt = LoraProAdamW(model, lr=1e-2)
    before = model.base_model.model[0].lora_B["default"].weight.detach().clone()
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model.base_model.model[0].lora_B["default"].weight, before)
