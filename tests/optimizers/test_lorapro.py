"""`LoraProAdamW`, `register_lorapro_adjustment` and `AdamWLoRAPro` on tiny models: one full-mode step against an
independent evaluation of the recipe (dense projectors, a Kronecker Sylvester solve), efficient mode against
torch's AdamW fed the adjusted gradients, state_dict round trip, errors."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft import LoraProConfig, get_peft_model
from peft.optimizers import AdamWLoRAPro, LoraProAdamW, register_lorapro_adjustment, seed_cosine_scale
from peft.tuners.lorapro import math as lp

F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _model(dtype=F64, seed=0, **config):
    torch.manual_seed(seed)
    base = Net().to(dtype)
    kwargs = dict(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], modules_to_save=["head"], damping=0.0)
    kwargs.update(config)
    return get_peft_model(base, LoraProConfig(**kwargs))


def _backward(model, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=gen).to(dtype)
    y = torch.randn(8, 3, generator=gen).to(dtype)
    model.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


def _layer(model, name):
    return model.base_model.model.get_submodule(name)


def _w_grad(model, name, seed):
    """dL/dW of layer `name` (m, n) via a zero delta added to W: the full gradient LoRA never forms."""
    layer = _layer(model, name)
    base = layer.get_base_layer()
    delta = torch.zeros_like(base.weight, requires_grad=True)
    handle = base.register_forward_pre_hook(lambda mod, args: None)
    orig = base.forward
    base.forward = lambda x: nn.functional.linear(x, base.weight + delta, base.bias)
    try:
        _backward(model, seed)
    finally:
        base.forward = orig
        handle.remove()
    return delta.grad.detach().clone()


def _reference_full_step(A, B, g, s, m, v, t, lr, betas, eps, wd):
    """DESIGN.md section 5, evaluated step by step with dense projectors and a Kronecker Sylvester solve."""
    b1, b2 = betas
    PB = B @ torch.linalg.pinv(B)
    PA = torch.linalg.pinv(A) @ A
    g_tilde = PB @ g + (torch.eye(B.shape[0], dtype=F64) - PB) @ g @ PA
    m = b1 * m + (1 - b1) * g_tilde
    v = b2 * v + (1 - b2) * g_tilde**2
    U = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    gA, gB = s * B.T @ U, s * U @ A.T
    r = A.shape[0]
    BtB, AAt = B.T @ B, A @ A.T
    if torch.count_nonzero(B) == 0:
        new_gA, new_gB = torch.zeros_like(gA), gB @ torch.linalg.inv(AAt) / s**2
    else:
        C = -(1 / s**2) * torch.linalg.inv(BtB) @ gA @ A.T
        eye = torch.eye(r, dtype=F64)
        X = torch.linalg.solve(torch.kron(BtB, eye) + torch.kron(eye, AAt.T.contiguous()), C.flatten()).reshape(r, r)
        new_gA = torch.linalg.inv(BtB) @ gA / s**2 + X @ A
        P_perp = torch.eye(B.shape[0], dtype=F64) - B @ torch.linalg.inv(BtB) @ B.T
        new_gB = P_perp @ gB @ torch.linalg.inv(AAt) / s**2 - B @ X
    return A - lr * (new_gA + wd * A), B - lr * (new_gB + wd * B), m, v


def test_full_mode_steps_match_the_recipe():
    model = _model(use_rslora=True)
    lr, betas, eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    opt = LoraProAdamW(model, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    refs = {}
    for name in ("fc1", "fc2"):
        layer = _layer(model, name)
        m, n = layer.out_features, layer.in_features
        refs[name] = [torch.zeros(m, n, dtype=F64), torch.zeros(m, n, dtype=F64)]
    for t, seed in ((1, 1), (2, 2), (3, 3)):
        expected = {}
        for name in ("fc1", "fc2"):
            layer = _layer(model, name)
            A, B = (w.detach().clone() for w in layer.lorapro_factors("default"))
            g = _w_grad(model, name, seed)
            new_A, new_B, refs[name][0], refs[name][1] = _reference_full_step(
                A, B, g, layer.scaling["default"], *refs[name], t, lr, betas, eps, wd)
            expected[name] = (new_A, new_B)
        _backward(model, seed)
        opt.step()
        for name, (new_A, new_B) in expected.items():
            A, B = _layer(model, name).lorapro_factors("default")
            torch.testing.assert_close(A.detach(), new_A, atol=1e-10, rtol=1e-8, msg=f"A of {name}, step {t}")
            torch.testing.assert_close(B.detach(), new_B, atol=1e-10, rtol=1e-8, msg=f"B of {name}, step {t}")
    state = opt.state[_layer(model, "fc1").lorapro_factors("default")[0]]
    assert state["step"] == 3 and state["exp_avg"].shape == (5, 6)


def test_efficient_mode_equals_adamw_on_adjusted_gradients():
    model = _model(mode="efficient")
    twin = copy.deepcopy(model)
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    handle = register_lorapro_adjustment(ref, twin)
    for seed in (1, 2, 3):
        for mdl, o in ((model, opt), (twin, ref)):
            _backward(mdl, seed)
            o.step()
    handle.remove()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10, msg=name)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head, "the head is trained (plain AdamW) in the same optimizer"


def test_sgd_with_registered_adjustment_is_algorithm_1():
    model = _model()
    layer = _layer(model, "fc1")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    handle = register_lorapro_adjustment(opt, model)
    _backward(model)
    A, B = layer.lorapro_factors("default")
    before = A.detach().clone(), B.detach().clone()
    gA, gB = layer.lorapro_adjusted_gradients("default", A.grad, B.grad)
    opt.step()
    torch.testing.assert_close(A.detach(), before[0] - 0.1 * gA)
    torch.testing.assert_close(B.detach(), before[1] - 0.1 * gB)
    handle.remove()
    _backward(model, 2)
    raw = A.grad.clone()
    opt.step()  # no adjustment any more
    assert torch.equal(A.grad, raw)


@pytest.mark.parametrize("positional", [True, False])
def test_registered_adjustment_with_a_closure_adjusts_the_closure_gradients(positional):
    """`step(closure)`: the closure makes the gradients inside the step, so they are adjusted after it runs (a pre-hook
    alone would adjust the previous gradients and let the step use the plain ones)."""
    models = [_model(init_lora_weights=False), _model(init_lora_weights=False)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in models]
    for m, o in zip(models, opts):
        register_lorapro_adjustment(o, m)
    for seed in (1, 2):
        _backward(models[0], seed)
        opts[0].step()
        closure = functools.partial(_backward, models[1], seed)
        loss = opts[1].step(closure) if positional else opts[1].step(closure=closure)
        assert torch.isfinite(loss)
    for (name, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_state_dict_round_trip_and_resume_are_exact(mode):
    model = _model(mode=mode, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    for seed in (1, 2):
        _backward(model, seed, torch.float32)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": copy.deepcopy(model.state_dict()), "opt": opt.state_dict()}, buffer)
    for seed in (3, 4):
        _backward(model, seed, torch.float32)
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(mode=mode, dtype=torch.float32, seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = LoraProAdamW(resumed, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_dict()["state"].keys() == saved["opt"]["state"].keys()
    for seed in (3, 4):
        _backward(resumed, seed, torch.float32)
        opt2.step()
    for (name, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name


def test_bf16_parameters_keep_fp32_moments_through_load():
    model = _model(dtype=torch.bfloat16, damping=1e-8)
    opt = LoraProAdamW(model, lr=1e-2)
    for seed in (1, 2):
        _backward(model, seed, torch.bfloat16)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt2 = LoraProAdamW(model, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for o in (opt, opt2):
        moments = [v for st in o.state.values() for k, v in st.items() if k.startswith("exp_avg")]
        assert moments and all(m.dtype == torch.float32 for m in moments)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_model_cast_to_bf16_steps_like_fp32(mode):
    """A model cast whole to bf16 after get_peft_model (A and B in bf16 too): the r x r work runs in fp32 (eigh has
    no bf16 kernel), the factors stay bf16 and follow the fp32 model's step to bf16 precision."""
    models = [_model(dtype=torch.float32, mode=mode, damping=1e-8) for _ in range(2)]
    models[1].to(torch.bfloat16)
    for model in models:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    ref, low = models
    for model, dtype in ((ref, torch.float32), (low, torch.bfloat16)):
        opt = LoraProAdamW(model, lr=1e-2)
        for seed in (1, 2):
            _backward(model, seed, dtype)
            opt.step()
    for (name, a), (_, b) in zip(ref.named_parameters(), low.named_parameters()):
        if "lora_" in name:
            assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
            torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.02)


def test_first_step_from_zero_b_is_finite_and_moves_b_only():
    model = _model(damping=1e-8, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=1e-3)
    A, B = _layer(model, "fc1").lorapro_factors("default")
    A0 = A.detach().clone()
    _backward(model, 1, torch.float32)
    opt.step()
    assert torch.equal(A.detach(), A0) and B.abs().sum() > 0 and torch.isfinite(B).all()


def test_zero_gradients_leave_factors_unchanged():
    model = _model(init_lora_weights=False, dtype=torch.float32)
    opt = LoraProAdamW(model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1, torch.float32)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_conv2d_and_embedding_layers_step():
    torch.manual_seed(0)
    base = nn.ModuleDict({"emb": nn.Embedding(10, 6), "conv": nn.Conv2d(2, 4, 3)})

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = base["emb"], base["conv"]

        def forward(self, ids, img):
            return self.emb(ids).sum() + self.conv(img).sum()

    model = get_peft_model(Wrap(), LoraProConfig(r=2, target_modules=["emb", "conv"], init_lora_weights=False))
    opt = LoraProAdamW(model, lr=1e-3)
    assert len(opt.pairs) == 2
    for _ in range(2):
        model.zero_grad()
        model(torch.tensor([1, 2, 3]), torch.randn(1, 2, 5, 5)).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adamw_lorapro_seed_api():
    model = _model(modules_to_save=None, lora_alpha=4)  # s = 2
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = AdamWLoRAPro(lora, lr=1e-2, weight_decay=0.0, T_max=2, scaling_factor=2.0)
    assert len(opt.pairs) == 2
    twin_model = copy.deepcopy(model)
    twin = LoraProAdamW(twin_model, lr=1e-2)
    for seed in (1,):
        for mdl, o in ((model, opt), (twin_model, twin)):
            _backward(mdl, seed)
            o.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q)  # step 1: schedule factor 1
    assert [round(seed_cosine_scale(t, 2), 6) for t in range(1, 8)] == [1.0, 0.5, 1.0, 0.853553, 0.5, 0.146447, 1.0]
    with pytest.raises(ValueError, match="scaling_factor=3.0 disagrees"):
        AdamWLoRAPro(lora, scaling_factor=3.0)
    with pytest.raises(ValueError, match="partner"):
        AdamWLoRAPro(lora[:1])
    with pytest.raises(ValueError, match="cannot be paired"):
        AdamWLoRAPro([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="T_max=0"):
        AdamWLoRAPro(lora, T_max=0)
    with pytest.raises(ValueError, match="Parameter #1 is a dict, expected a tensor"):
        AdamWLoRAPro([lora[0], {"params": lora[1:]}])


def test_bad_input_errors():
    bare = Net()  # a plain LoRA model is fine (tests/optimizers/test_lorapro_plain_lora.py); no LoRA at all is not
    with pytest.raises(ValueError, match="no LoRA layers.*LoraProConfig"):
        LoraProAdamW(bare)
    with pytest.raises(ValueError, match="no LoRA layers"):
        register_lorapro_adjustment(torch.optim.SGD(bare.parameters(), lr=0.1), bare)
    with pytest.raises(ValueError, match="r <= min"):
        get_peft_model(Net(), LoraProConfig(r=5, target_modules=["fc2"]))  # fc2 is 4 x 5
    model = _model()
    _layer(model, "fc1").lora_B["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="B is frozen"):
        LoraProAdamW(model)
    model = _model()
    for kwargs, match in ((dict(lr=-1), "lr=-1"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
                          (dict(weight_decay=float("nan")), "weight_decay"), (dict(mode="fast"), "mode='fast'"),
                          (dict(x_mode="symmetry"), "x_mode='symmetry'"), (dict(damping=-1.0), "damping")):
        with pytest.raises(ValueError, match=match):
            LoraProAdamW(model, **kwargs)
    opt = LoraProAdamW(model)
    with pytest.raises(ValueError, match="twice"):
        register_lorapro_adjustment(opt, model)
    sgd = torch.optim.SGD([_layer(model, "fc1").lora_A["default"].weight], lr=0.1)
    with pytest.raises(ValueError, match="only one factor"):
        register_lorapro_adjustment(sgd, model)
    with pytest.raises(ValueError, match="mode='x'"):
        LoraProConfig(mode="x")


class Tower(nn.Module):
    """`layers` blocks of one shape (stepped together as one stack) and an output layer of another shape."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(layers))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(x)


def _tower(layers: int, mode: str, dtype=F64):
    torch.manual_seed(0)
    targets = [f"blocks.{i}" for i in range(layers)] + ["out"]
    return get_peft_model(Tower(layers).to(dtype), LoraProConfig(r=2, lora_alpha=3, target_modules=targets, mode=mode))


def _expected_step(opt, refs, lr, wd):
    """The old per-pair step with the 2-D math functions, for every pair with a gradient: {pair index: (A, B)};
    `refs` holds each pair's step count and moments, updated."""
    hp_args = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)
    expected = {}
    for i, pair in enumerate(opt.pairs):
        if pair.A.grad is None:
            continue
        A, B = (t.clone() for t in pair.layer.lorapro_matrices(pair.adapter_name))
        gA, gB = pair.A.grad.flatten(1), pair.B.grad.flatten(1)
        opts, ref = pair.options, refs.setdefault(i, {"step": 0})
        ref["step"] += 1
        hp = lp.AdamHyper(lr, **hp_args)
        if opts.mode == "full":
            ref.setdefault("m", [torch.zeros(B.shape[0], A.shape[1], dtype=F64) for _ in range(2)])
            expected[i] = lp.full_mode_step(A, B, gA, gB, pair.scaling, *ref["m"], ref["step"], hp, opts.x_mode,
                                            opts.damping)
        else:
            ref.setdefault("m", [torch.zeros_like(t) for t in (A, A, B, B)])
            expected[i] = lp.efficient_mode_step(A, B, gA, gB, pair.scaling, tuple(ref["m"]), ref["step"], hp,
                                                 opts.x_mode, opts.damping)
    return expected


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_same_shape_layers_stepped_together_equal_the_per_pair_step(mode):
    """4 same-shape layers (one stack) and one other: each pair moves as the per-pair 2-D step moves it, also when a
    layer had no gradient at step 1 (its step count then differs from its stack-mates')."""
    model = _tower(4, mode)
    lr, wd = 1e-2, 0.05
    opt = LoraProAdamW(model, lr=lr, weight_decay=wd)
    refs: dict = {}
    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        model.zero_grad(set_to_none=True)
        model(torch.randn(8, 6, generator=gen, dtype=F64)).square().mean().backward()
        if seed == 1:
            model.base_model.model.blocks[1].lora_A["default"].weight.grad = None
            model.base_model.model.blocks[1].lora_B["default"].weight.grad = None
        expected = _expected_step(opt, refs, lr, wd)
        opt.step()
        assert len(expected) == (4 if seed == 1 else 5)
        for i, (new_A, new_B) in expected.items():  # tolerances of the recipe test: Adam's U amplifies rounding
            pair = opt.pairs[i]
            torch.testing.assert_close(pair.A.detach().flatten(1), new_A, atol=1e-10, rtol=1e-8, msg=f"A {i} {seed}")
            torch.testing.assert_close(pair.B.detach().flatten(1), new_B, atol=1e-10, rtol=1e-8, msg=f"B {i} {seed}")
    pairs = opt.pairs
    assert [opt.state[p.A]["step"] for p in pairs] == [3, 2, 3, 3, 3]
    for i, pair in enumerate(pairs):  # the moments live per parameter, as before
        keys = [(pair.A, 0), (pair.A, 1)] if mode == "full" else [(pair.A, 0), (pair.A, 1), (pair.B, 2), (pair.B, 3)]
        for param, j in keys:
            torch.testing.assert_close(opt.state[param]["exp_avg" if j % 2 == 0 else "exp_avg_sq"], refs[i]["m"][j],
                                       atol=1e-10, rtol=1e-8)


class _OpCount(TorchDispatchMode):
    """Counts the aten ops that make a kernel (views do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def _ops_per_step(layers: int, mode: str) -> int:
    model = _tower(layers, mode, torch.float32)
    model(torch.randn(8, 6)).square().mean().backward()
    opt = LoraProAdamW(model, lr=1e-2)
    opt.step()  # state created
    with _OpCount() as count:
        opt.step()
    return count.ops


@pytest.mark.parametrize("mode, per_layer", [("efficient", 5), ("full", 20)])
def test_ops_per_step_barely_grow_with_same_shape_layers(mode, per_layer):
    """8 same-shape layers cost less than twice the ops of 1 (it was ~70 ops more per layer: on a GPU each is a
    kernel launch). What remains per layer in full mode is its (m, n) work: g~, the Adam direction, B^T U and U A^T."""
    one, eight = _ops_per_step(1, mode), _ops_per_step(8, mode)
    assert eight < 2 * one, (one, eight)
    assert (eight - one) / 7 <= per_layer, (one, eight)
