"""LoraGAModel: the init follows the formulas on every layer type, keeps the outputs, releases the gradients,
works under any adapter name, and its first SGD step follows the best rank-2r approximation of G."""

import functools
import gc
import math
import weakref

import pytest
import torch
from torch import nn

from peft import LoraConfig, LoraGAConfig, PeftType, get_peft_model, preprocess_loraga
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.loraga import init_math as im
from peft.tuners.loraga.context import _OPEN, _PENDING
from peft.tuners.loraga.model import factor_params, to_matrix
from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient
from tests.tuners.loraga.helpers import TARGETS, Mixed, llama, mixed_batches, token_batches


@functools.lru_cache(maxsize=1)
def _llama_grads():
    return estimate_gradient(llama(), token_batches())


def _wrap(model, config, grads, adapter_name="default"):
    with LoraGAContext(model=model, named_grad=grads):
        return get_peft_model(model, config, adapter_name=adapter_name)


def _logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"])
    return out["logits"] if isinstance(out, dict) else out.logits


def test_config_type_and_validation():
    config = LoraGAConfig(target_modules=["q"], r=4)
    assert config.peft_type == PeftType.LORAGA and config.direction == "ArB2r" and config.scale == "stable"
    assert LoraGAConfig(scale="weight_svd").scale == "weightS"  # upstream's name accepted
    for field, value in [("direction", "ABr"), ("scale", "huge"), ("dtype", "bf8"), ("bsz", 0), ("iters", -1),
                         ("max_length", 1.5), ("stable_gamma", 0)]:
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            LoraGAConfig(**{field: value})


@pytest.mark.parametrize("direction", im.DIRECTIONS)
@pytest.mark.parametrize("scale", im.SCALES)
def test_init_matches_formulas_and_keeps_output_fp32(direction, scale):
    model, batches = llama(), token_batches()
    grads = _llama_grads()
    ref = _logits(model, batches[0])
    weights = {k: m.weight.detach().clone() for k, m in model.named_modules() if k.endswith(tuple(TARGETS))}
    config = LoraGAConfig(target_modules=TARGETS, r=2, lora_alpha=4, direction=direction, scale=scale, dtype="fp64")
    torch.manual_seed(3)
    peft_model = _wrap(model, config, grads)
    rel = ((_logits(peft_model, batches[0]) - ref).norm() / ref.norm()).item()
    assert rel < 1e-5
    for key, layer in peft_model.base_model.tuner_layers():
        A, B = factor_params(layer, "default")
        s = layer.scaling["default"]
        U, S, Vh = torch.linalg.svd(grads[key].double(), full_matrices=False)
        # A's rows and B's columns are singular vectors of G from disjoint index sets, times the scale factor.
        rows = torch.abs(A.double() @ Vh[: 4].T)  # (r, 2r): one entry per row equals the factor
        cols = torch.abs(U[:, : 4].T @ B.double())  # (2r, r)
        sigma_W = torch.linalg.svdvals(weights[key].double())[:2]
        factor = im.scale_factor(scale, B.shape[0], s, 16, sigma_W)
        expected = torch.full((2,), factor, dtype=torch.float64)
        torch.testing.assert_close(rows.max(dim=1).values, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cols.max(dim=0).values, expected, rtol=1e-5, atol=1e-6)
        picked = set(rows.argmax(dim=1).tolist()) | set(cols.argmax(dim=0).tolist())
        assert picked == {0, 1, 2, 3}
        if direction == "ArB2r":
            assert rows.argmax(dim=1).tolist() == [0, 1] and cols.argmax(dim=0).tolist() == [2, 3]
        expected_W = weights[key] - s * (B.float() @ A.float())
        torch.testing.assert_close(layer.get_base_layer().weight, expected_W, rtol=0, atol=1e-6)


def test_every_layer_type_keeps_output():
    model, batches = Mixed(), mixed_batches()
    grads = estimate_gradient(model, batches)
    assert set(grads) == {"emb", "proj", "conv", "head"}
    assert grads["proj"].shape == (12, 16) and grads["conv"].shape == (6, 4, 3, 3)
    ref = _logits(model, batches[0])
    peft_model = _wrap(model, LoraGAConfig(target_modules=["emb", "proj", "conv", "head"], r=2, scale="unit"), grads)
    rel = ((_logits(peft_model, batches[0]) - ref).norm() / ref.norm()).item()
    assert rel < 1e-5
    conv = peft_model.base_model.model.conv
    A, B = factor_params(conv, "default")
    U, _, Vh = torch.linalg.svd(to_matrix(grads["conv"], "conv2d").double(), full_matrices=False)
    torch.testing.assert_close(torch.abs(A.flatten(1).double() @ Vh[:2].T), torch.eye(2, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_bf16_init_error_is_small():
    """bf16 base: W - s B A is rounded once to bf16; the output error is that rounding (reported, not 1e-5)."""
    model, batches = llama(torch.bfloat16), token_batches()
    grads = estimate_gradient(model, batches)
    ref = _logits(model, batches[0]).float()
    weights = {k: m.weight.detach().clone() for k, m in model.named_modules() if k.endswith(tuple(TARGETS))}
    peft_model = _wrap(model, LoraGAConfig(target_modules=TARGETS, r=2, use_rslora=True), grads)
    rel = ((_logits(peft_model, batches[0]).float() - ref).norm() / ref.norm()).item()
    fp32 = _logits(llama(), batches[0])
    own = ((ref - fp32).norm() / fp32.norm()).item()  # for scale: the bf16 base against the same base in fp32
    print(f"bf16 init relative error: {rel:.2e} (bf16 base vs fp32 base: {own:.2e})")
    assert rel < 2e-2
    for key, layer in peft_model.base_model.tuner_layers():  # fp32 A, B as stored; W - s B A rounded once
        A, B = factor_params(layer, "default")
        assert A.dtype == torch.float32
        expected = (weights[key].float() - layer.scaling["default"] * (B @ A)).to(torch.bfloat16)
        assert torch.equal(layer.get_base_layer().weight, expected)


def test_any_adapter_name_and_second_adapter():
    model, batches = llama(), token_batches()
    grads = estimate_gradient(model, batches)
    ref = _logits(model, batches[0])
    peft_model = _wrap(model, LoraGAConfig(target_modules=TARGETS, r=2), grads, adapter_name="ga")
    assert peft_model.active_adapter == "ga"
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert "ga" in layer.lora_A and layer.lora_B["ga"].weight.abs().sum() > 0
    with LoraGAContext(model=peft_model, named_grad=estimate_gradient(peft_model, batches)):
        peft_model.add_adapter("second", LoraGAConfig(target_modules=["q_proj"], r=2))
    peft_model.base_model.set_adapter(["ga", "second"])
    torch.testing.assert_close(_logits(peft_model, batches[0]), ref, atol=1e-5, rtol=1e-5)


def test_missing_gradient_names_module():
    model, batches = llama(), token_batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = estimate_gradient(model, batches, peft_config=LoraGAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"No estimated gradient for target module 'model\.layers\.0\.self_attn\.v_"):
        _wrap(model, LoraGAConfig(target_modules=["q_proj", "v_proj"], r=2), grads)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # all-or-nothing ...
    for key, value in model.state_dict().items():  # ... the q_proj layers initialised first left no offset behind
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("upstream", [False, True])
def test_failed_injection_leaves_base_weights_and_add_adapter_too(upstream):
    """An error at the last target (rank too large there) comes after the other layers got their factors: none of
    their base weights is offset, for get_peft_model (both spellings) and for add_adapter."""
    model, batches = llama(), token_batches()
    ref, state = _logits(model, batches[0]), {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(target_modules=TARGETS, r=2, rank_pattern={r"layers\.1\.self_attn\.v_proj": 5})
    config = (LoraConfig(init_lora_weights="lora_ga", **kwargs) if upstream else LoraGAConfig(**kwargs))
    with pytest.raises(ValueError, match=r"2\*r <= min\(out, in\).*layers\.1\.self_attn\.v_proj"):
        _wrap(model, config, _llama_grads())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not _PENDING and not _OPEN
    peft_model = _wrap(model, LoraGAConfig(target_modules=["q_proj"], r=2), _llama_grads())
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with LoraGAContext(model=peft_model, named_grad=_llama_grads()), pytest.raises(ValueError, match="2\\*r"):
        peft_model.add_adapter("second", LoraGAConfig(**kwargs))
    assert all(torch.equal(v, state[k]) for k, v in peft_model.state_dict().items())
    torch.testing.assert_close(_logits(peft_model, batches[0]), ref, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_targets_and_tied_head():
    """GPT-2's Conv1D (stored in x out): G and W are transposed to (out, in), so the stable scale uses
    m = out_features; its tied lm_head / wte cannot be offset alone and is refused, naming the other module."""
    from tests.helpers.tiny_models import tiny_gpt2

    model, batches = tiny_gpt2(), token_batches()
    grads = estimate_gradient(model, batches)
    assert grads["transformer.h.0.attn.c_attn"].shape == (16, 48)  # like the stored weight
    ref = _logits(model, batches[0])
    with pytest.warns(UserWarning, match="Conv1D"):
        peft_model = _wrap(model, LoraGAConfig(target_modules=["c_attn", "c_fc"], r=2, dtype="fp64"), grads)
    rel = ((_logits(peft_model, batches[0]) - ref).norm() / ref.norm()).item()
    assert rel < 1e-5
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    A, B = factor_params(layer, "default")
    U, _, Vh = torch.linalg.svd(grads["transformer.h.0.attn.c_attn"].T.double(), full_matrices=False)  # (48, 16)
    factor = 48**0.25 / 4
    torch.testing.assert_close((A.double() @ Vh[:2].T).abs(), factor * torch.eye(2, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close((U[:, 2:4].T @ B.double()).abs(), factor * torch.eye(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    for target, other in (["lm_head", "transformer.wte"], ["wte", "lm_head"]):
        model = tiny_gpt2()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"tied to \['{other}'\]"):
            _wrap(model, LoraGAConfig(target_modules=["c_fc", target], r=2), grads)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rank_too_large_is_clear():
    model, batches = llama(), token_batches()
    grads = estimate_gradient(model, batches)
    with pytest.raises(ValueError, match=r"2\*r <= min\(out, in\).*v_proj.*8 x 16"):
        _wrap(model, LoraGAConfig(target_modules=["v_proj"], r=5), grads)


def test_gradients_released_after_init():
    model, batches = llama(), token_batches()
    grads = estimate_gradient(model, batches)
    probe = weakref.ref(grads["model.layers.0.self_attn.q_proj"])
    peft_model = _wrap(model, LoraGAConfig(target_modules=TARGETS, r=2), grads)
    del grads
    gc.collect()
    assert probe() is None and not _OPEN and not _PENDING
    for module in peft_model.modules():
        assert not any(isinstance(v, torch.Tensor) and "grad" in k for k, v in vars(module).items())


def test_no_context_keeps_plain_init_with_warning():
    model = llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        peft_model = get_peft_model(model, LoraGAConfig(target_modules=TARGETS, r=2))
    assert torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


@pytest.mark.parametrize("direction", im.DIRECTIONS)
@pytest.mark.parametrize("scale", im.SCALES)
def test_first_sgd_step_follows_best_rank_2r_approximation(direction, scale):
    """One Linear, loss <C, y>: G = C^T X is known; one small SGD step on A, B moves W along G_2r (paper eq. 8):
    B B^T G + G A^T A is the rank-2r truncation of G for any split of the top 2r singular pairs, times c^2 s^2."""
    torch.manual_seed(0)
    m, n, r, lr = 24, 20, 3, 1e-6
    model = nn.Sequential(nn.Linear(n, m, bias=False)).double()
    X, C = torch.randn(64, n, dtype=torch.float64), torch.randn(64, m, dtype=torch.float64)

    def loss_fn(mod):
        return (mod(X) * C).sum()

    G = C.T @ X  # dL/dW, (m, n)
    config = LoraGAConfig(target_modules=["0"], r=r, lora_alpha=r, scale=scale, direction=direction, dtype="fp64")
    peft_model = _wrap(model, config, {"0": G})
    layer = peft_model.base_model.model[0]
    before = layer.get_delta_weight("default").clone()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    loss_fn(peft_model).backward()
    opt.step()
    step = (layer.get_delta_weight("default") - before).flatten()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = -(U[:, : 2 * r] @ torch.diag(S[: 2 * r]) @ Vh[: 2 * r]).flatten()
    cosine = torch.nn.functional.cosine_similarity(step, best, dim=0).item()
    assert cosine > 0.99
    if scale == "gd":  # A, B divided by s: the step is lr * G_2r up to the O(lr^2) term s * lr^2 gB gA
        assert ((step - lr * best).norm() / (lr * best).norm()).item() < 1e-2


def test_upstream_spelling_same_init():
    batches = token_batches()
    model_a, model_b = llama(), llama()
    grads = estimate_gradient(model_a, batches)
    ours = _wrap(model_a, LoraGAConfig(target_modules=TARGETS, r=2, scale="gd_scale"), grads)
    config = LoraConfig(target_modules=TARGETS, r=2, init_lora_weights="lora_ga",
                        lora_ga_config={"direction": "ArB2r", "scale": "gd_scale"})

    def train_step():
        for batch in batches:
            model_b(**batch).loss.backward()

    preprocess_loraga(model_b, config, train_step)
    theirs = get_peft_model(model_b, config)
    assert not _PENDING  # consumed by the init
    for (_, la), (_, lb) in zip(ours.base_model.tuner_layers(), theirs.base_model.tuner_layers()):
        for x, y in zip(factor_params(la, "default"), factor_params(lb, "default")):
            torch.testing.assert_close(x.abs(), y.abs(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.get_base_layer().weight, lb.get_base_layer().weight, atol=1e-6, rtol=1e-5)
    assert math.isclose(theirs.peft_config["default"].r, 2)


def test_preprocess_loraga_cache_file_ours_and_upstreams(tmp_path):
    """cache_file: written on the first call, read on the next (no train_step then); upstream PEFT's cache keys
    (`<module>._peft_loraga_grad`) read as well, so an upstream user's cache gives the same init."""
    config = LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights="lora_ga", lora_ga_config={"scale": "unit"})
    model, batches = llama(), token_batches()

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    ours = tmp_path / "ours.pt"
    preprocess_loraga(model, config, train_step, cache_file=str(ours))
    first = get_peft_model(model, config)
    grads = torch.load(ours, weights_only=True)
    torch.save({f"{k}._peft_loraga_grad": v for k, v in grads.items()}, tmp_path / "upstream.pt")
    for cache in (ours, tmp_path / "upstream.pt"):
        other = llama()
        preprocess_loraga(other, config, lambda: pytest.fail("the cache must be used"), cache_file=str(cache))
        again = get_peft_model(other, config)
        for (_, la), (_, lb) in zip(first.base_model.tuner_layers(), again.base_model.tuner_layers()):
            torch.testing.assert_close(la.get_base_layer().weight, lb.get_base_layer().weight, rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "compute", "stored"), [
    ("fp32", torch.float32, torch.float32), ("fp64", torch.float64, torch.float32),
    ("bf16", torch.float32, torch.bfloat16), ("fp16", torch.float32, torch.float16)])
def test_dtype_sets_init_precision_and_factor_storage(monkeypatch, dtype, compute, stored):
    """`dtype`: the SVD runs in `compute`, A and B are stored in `stored`, and the offset uses them as stored."""
    import peft.tuners.loraga.model as ga_model

    seen, real = [], ga_model.lora_ga_factors
    monkeypatch.setattr(ga_model, "lora_ga_factors", lambda *a, **k: seen.append(k["compute_dtype"]) or real(*a, **k))
    model, batches = llama(), token_batches()
    ref = _logits(model, batches[0])
    weights = {k: m.weight.detach().clone() for k, m in model.named_modules() if k.endswith(tuple(TARGETS))}
    peft_model = _wrap(model, LoraGAConfig(target_modules=TARGETS, r=2, dtype=dtype), _llama_grads())
    assert set(seen) == {compute} and len(seen) == 2 * len(TARGETS)
    for key, layer in peft_model.base_model.tuner_layers():
        A, B = factor_params(layer, "default")
        assert A.dtype == B.dtype == stored and A.requires_grad
        expected = weights[key] - layer.scaling["default"] * (B.float() @ A.float())
        torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-7)
    rel = ((_logits(peft_model, batches[0]) - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if stored == torch.float32 else 1e-2)  # half factors: the branch itself runs in half


def test_upstream_spelling_without_gradients_keeps_default_init():
    """No preprocess_loraga: a warning, LoRA's default init (B = 0) and an unchanged model, as upstream does."""
    model, batches = llama(), token_batches()
    ref = _logits(model, batches[0])
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=2, init_lora_weights="lora_ga"))
    for _, layer in peft_model.base_model.tuner_layers():
        assert torch.count_nonzero(factor_params(layer, "default")[1]) == 0
    assert torch.equal(_logits(peft_model, batches[0]), ref)


def test_official_init_lora_weights_value_initialises():
    model, batches = llama(), token_batches()
    ref = _logits(model, batches[0])
    config = LoraGAConfig(target_modules=TARGETS, r=2, init_lora_weights="lora_ga")
    peft_model = _wrap(model, config, _llama_grads())
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0
    torch.testing.assert_close(_logits(peft_model, batches[0]), ref, rtol=1e-5, atol=1e-6)
